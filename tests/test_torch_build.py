"""The torch build for a machine (`make venv`): the driver's version -> the CUDA wheels it runs; the pins of the
Makefile and the image agree; a GPU that the installed torch cannot use is said in one line by the entry points."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lgd_ray import torch_build
from lgd_ray.cli import unusable_gpu

ROOT = Path(__file__).resolve().parent.parent


def test_the_newest_cuda_build_the_driver_runs():
    assert torch_build.parse_driver("570.86.15\n") == (570, 86) and torch_build.parse_driver("") is None
    assert torch_build.cuda_build((580, 95)) == "cu130"
    assert torch_build.cuda_build((575, 51)) == "cu128" and torch_build.cuda_build((570, 26)) == "cu128"
    assert torch_build.cuda_build((570, 25)) == "cu126" and torch_build.cuda_build((560, 28)) == "cu126"
    assert torch_build.cuda_build(None) == ""  # no driver: pip's default build
    with pytest.raises(ValueError, match=r"driver 535.183 is older than any CUDA build of torch here \(cu126 needs "
                                         r"560.28\): update the driver, or set TORCH_INDEX"):
        torch_build.cuda_build((535, 183))
    assert torch_build.index_url("cu128") == "https://download.pytorch.org/whl/cu128" and torch_build.index_url("") == ""


def test_makefile_and_image_pin_the_same_torch_for_a_build_the_cluster_drivers_run():
    docker = dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "clusters" / "Dockerfile").read_text(), re.M))
    make = (ROOT / "Makefile").read_text()
    pins = dict(re.findall(r"(torch|torchvision)==(\S+)", re.search(r"^TORCH \?= (.+)$", make, re.M).group(1)))
    assert pins == {"torch": docker["TORCH_VERSION"], "torchvision": docker["TORCHVISION_VERSION"]}
    assert "$(shell python3 lgd_ray/torch_build.py)" in make and "--index-url $(TORCH_INDEX)" in make
    # the image's CUDA is a build of the table, run by the 570 driver of the clusters' boot images
    assert docker["CUDA_TAG"] in torch_build.CUDA_BUILDS
    gcp = (ROOT / "clusters" / "gcp.yaml").read_text()
    majors = {int(m) for m in re.findall(r"common-cu\d+-ubuntu-\d+-nvidia-(\d+)", gcp)}
    assert majors == {570} and torch_build.CUDA_BUILDS[docker["CUDA_TAG"]][0] <= 570


@pytest.fixture
def gpu_driver(tmp_path, monkeypatch):
    """An nvidia-smi on PATH that reports a driver (this machine has none): what a GPU node's would print."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 570.86.15\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    return smi


def test_a_gpu_torch_cannot_use_is_said_in_one_line(gpu_driver):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch here uses a GPU")
    said = unusable_gpu()
    assert said.startswith("device: this machine has an NVIDIA GPU (driver 570.86) that torch ") and "\n" not in said
    assert "install the cu128 build: `make venv` picks it (TORCH_INDEX=https://download.pytorch.org/whl/cu128)" in said
    r = subprocess.run([sys.executable, "-m", "lgd_ray.evaluate", "/nonexistent-run"], capture_output=True, text=True,
                       timeout=300, env=os.environ)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[0] == f"warning: {said}" and lines[1].startswith("error: "), r.stderr


def test_no_driver_no_word(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert unusable_gpu() == ""
