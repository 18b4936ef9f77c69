"""offload-sidecar: the offloading reverse proxy (data path in progress)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="offload-sidecar",
        description="Reverse proxy in front of a model server that offloads a share of the "
        "requests to a remote backend while the model runs hot.",
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
