"""The images the real node runs, built here by build-images.sh (buildah, no registry)."""

from __future__ import annotations

import collections
import subprocess
from collections.abc import Callable
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build-images.sh")


class ImageBuildFailed(RuntimeError):
    pass


def build_images(echo: Callable[[str], None] = lambda line: None) -> dict[str, Path]:
    """Runs build-images.sh (seconds when nothing changed, a few minutes the first time),
    passing its progress lines to `echo`; returns image reference -> OCI archive."""
    tail: collections.deque[str] = collections.deque(maxlen=80)
    with subprocess.Popen(
        ["bash", str(BUILD_SCRIPT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        images: dict[str, Path] = {}
        for line in proc.stdout:
            line = line.rstrip("\n")
            parts = line.split(" ")
            if len(parts) == 2 and parts[1].endswith(".tar") and parts[1].startswith("/"):
                images[parts[0]] = Path(parts[1])
            else:
                tail.append(line)
                echo(line)
    if proc.returncode != 0:
        raise ImageBuildFailed(
            f"{BUILD_SCRIPT} failed with code {proc.returncode}; last lines:\n" + "\n".join(tail)
        )
    missing = [str(p) for p in images.values() if not p.is_file()]
    if len(images) < 3 or missing:
        raise ImageBuildFailed(f"{BUILD_SCRIPT} gave {images}; missing archives: {missing}")
    return images
