"""``python -m sidecar.demo``: see :func:`sidecar.demo.cli.main`."""

import sys

from sidecar.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
