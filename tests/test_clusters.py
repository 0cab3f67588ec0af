"""Cluster files: the autoscaler YAMLs pass Ray's own schema validation; the KubeRay RayJob has the right shape."""
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from lgd_ray.config import load_config

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_autoscaler_yaml_is_valid(name):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for n, t in types.items() if n != raw["head_node_type"]]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu)
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in (CLUSTERS / name).read_text()
    assert any("pip install" in c for c in raw["setup_commands"])
    broken = {**raw, "no_such_key": 1}
    with pytest.raises(Exception, match="no_such_key"):
        validate_config(prepare_config(broken))


def test_kuberay_rayjob_runs_imagenet1k():
    job = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "lgd_ray.distill", "imagenet1k"]
    cfg = load_config(argv[3], argv[4:])  # the overrides are valid config keys
    assert cfg.data.root == "/data/imagenet" and cfg.out.startswith("/runs")
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    workers = cluster["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and workers[0]["minReplicas"] <= workers[0]["replicas"] <= workers[0]["maxReplicas"]
    mounts = {m["mountPath"] for m in workers[0]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/data/imagenet", "/runs"} <= mounts
