"""``python -m sidecar.gateway``: the same as ``offload-sidecar --mode gateway``."""

import sys

from sidecar.gateway.cli import main

sys.exit(main(prog="python -m sidecar.gateway"))
