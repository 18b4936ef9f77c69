"""``python -m sidecar.proxy``: see :func:`sidecar.proxy.cli.main`."""

import sys

from sidecar.proxy.cli import main

sys.exit(main())
