"""``python -m sidecar.proxy``: see :func:`sidecar.proxy.server.main`."""

import sys

from sidecar.proxy.server import main

sys.exit(main())
