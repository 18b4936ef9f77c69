"""Files of the repository that the e2e tests apply."""

from pathlib import Path

from tests.modeldeployments import TUTORIAL_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD = REPO_ROOT / "crds" / "modeldeployment.yaml"
TESTDATA = REPO_ROOT / "tests" / "testdata"
TUTORIAL_CLUSTER_A = TESTDATA / "tutorial-cluster-a.yaml"  # the tutorial's Deployment + Service
TUTORIAL_MODELDEPLOYMENT = TUTORIAL_FILE  # the tutorial's ModelDeployment
