"""The ModelDeployment API (deployment.beamlit.com/v1alpha1).

`modeldeployment.yaml` is the CustomResourceDefinition; `model` is the same
definition as typed Python data, with the same defaults; `validation` holds the
rules the schema cannot express. Purely computational: nothing here does I/O
beyond reading the packaged CRD file, so the webhook and the sidecar can both
import it at no cost.
"""
