"""Which build of torch a machine can use: the CUDA wheels whose CUDA its NVIDIA driver runs, else pip's default.

    python3 lgd_ray/torch_build.py     the pip index URL for this machine ("" = pip's default index)

One table for `make venv` and the image: clusters/Dockerfile's CUDA_TAG is one of its builds, and the driver the
cluster files' boot images carry runs it (tests/test_torch_build.py). Runs without torch (it picks torch's build), so
it imports nothing of the package.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

# torch's CUDA wheel indexes, newest first, each with the oldest driver its CUDA toolkit's release notes allow
CUDA_BUILDS = {"cu130": (580, 65), "cu128": (570, 26), "cu126": (560, 28)}
INDEX = "https://download.pytorch.org/whl/{}"


def parse_driver(text: str) -> tuple[int, int] | None:
    """(major, minor) of a driver version as nvidia-smi prints it ("570.86.15"), None if there is none."""
    found = re.search(r"(\d+)\.(\d+)", text or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def driver_version() -> tuple[int, int] | None:
    """This machine's NVIDIA driver version, or None (no nvidia-smi, or it finds no GPU)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_driver(out.stdout.splitlines()[0]) if out.returncode == 0 and out.stdout.strip() else None


def cuda_build(driver: tuple[int, int] | None) -> str:
    """The newest CUDA build the driver runs; "" without a driver (pip's default build, which runs on the CPU).
    A driver older than every build is an error naming the oldest one's need."""
    if driver is None:
        return ""
    for build, needs in CUDA_BUILDS.items():
        if driver >= needs:
            return build
    oldest, needs = list(CUDA_BUILDS.items())[-1]
    raise ValueError(f"torch: the NVIDIA driver {driver[0]}.{driver[1]} is older than any CUDA build of torch here "
                     f"({oldest} needs {needs[0]}.{needs[1]}): update the driver, or set TORCH_INDEX")


def index_url(build: str) -> str:
    return INDEX.format(build) if build else ""


if __name__ == "__main__":
    try:
        print(index_url(cuda_build(driver_version())))
    except ValueError as e:
        sys.exit(str(e))
