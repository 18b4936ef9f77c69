"""``python -m sidecar.demo``: see :func:`sidecar.demo.cpu.main`."""

import sys

from sidecar.demo.cpu import main

sys.exit(main())
