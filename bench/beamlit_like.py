"""offload-sidecar with a random split: the Beamlit-like policy of bench/llm_bench.py.

    python bench/beamlit_like.py <offload-sidecar arguments>

The product spreads offloaded requests evenly (exactly ``percentage`` of every 100); a
proxy with weighted random routing flips a coin per request instead. This runs the
product's sidecar with that one difference, for the comparison only.
"""

from __future__ import annotations

import random
import sys

from sidecar.proxy import routing


class RandomSpread:
    """Each request goes to the remote with probability ``percentage`` / 100."""

    __slots__ = ("_share",)

    def __init__(self, percentage: int):
        self._share = percentage / 100

    def next_is_remote(self) -> bool:
        return random.random() < self._share


routing.PercentageSpread = RandomSpread  # type: ignore[misc, assignment]

if __name__ == "__main__":
    from sidecar.cli import main

    sys.exit(main(sys.argv[1:]))
