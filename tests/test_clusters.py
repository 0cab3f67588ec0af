"""Cluster files: the autoscaler YAMLs pass Ray's own schema validation plus the checks a schema cannot make; the
KubeRay RayJob holds what the operator reads; the image recipe's pins agree with pyproject.toml."""
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

from lgd_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/"


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (CLUSTERS / "Dockerfile").read_text(), re.M))


def _requirement(name: str) -> Requirement:
    return next(r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == name)


def _distill_commands(text: str) -> list[list[str]]:
    """Every `python -m lgd_ray.distill ...` command in a text (shell continuations and YAML comments joined)."""
    text = re.sub(r"\\\n[#\s]*", " ", text)
    return [shlex.split(m) for m in re.findall(r"python -m lgd_ray\.distill [^\n`]*", text)]


def _check_command(argv: list[str], gpu_types: set[str]):
    """A documented cluster command: a valid config whose data, prior, output and cache are shared URIs, pinned to
    an accelerator type the cluster declares; with --resume, so that a job run again (a retry after a lost head,
    a second apply) continues the run instead of being refused."""
    assert "--resume" in argv, " ".join(argv)
    cfg = load_config(argv[3], [a for a in argv[4:] if not a.startswith("--")])
    for key, value in (("out", cfg.out), ("cache", cfg.cache), ("data.prepared", cfg.data.prepared),
                       ("prior.model_id", cfg.prior.model_id)):
        assert "://" in value, f"{key}={value!r} in {' '.join(argv)}: every node must see it"
    assert cfg.ray.accelerator_type in gpu_types, (cfg.ray.accelerator_type, gpu_types)


def test_dockerfile_pins_agree_with_pyproject():
    args = _dockerfile_args()
    text = (CLUSTERS / "Dockerfile").read_text()
    assert args["RAY_VERSION"] in _requirement("ray").specifier
    assert args["TORCH_VERSION"] in _requirement("torch").specifier
    assert args["TORCHVISION_VERSION"] in _requirement("torchvision").specifier
    major, minor = map(int, args["TORCH_VERSION"].split(".")[:2])
    assert args["TORCHVISION_VERSION"].startswith(f"0.{minor + 15}.") and major == 2  # torchvision's pairing
    python = f"3.{args['PYTHON_TAG'].removeprefix('py3')}"
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert re.match(r"cu\d{3}$", args["CUDA_TAG"])
    # one CUDA for the base image and the torch wheels
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}" in text
    assert "--index-url \"https://download.pytorch.org/whl/${CUDA_TAG}\"" in text
    assert "HF_HOME=" in text and "pip install -e /home/ray/lgd_ray" in text
    # what the image holds, the build context lets in (bench/: `make gpu-check` on a node)
    ignore = (CLUSTERS / "Dockerfile.dockerignore").read_text()
    for folder in ("lgd_ray", "configs", "bench"):
        assert f"COPY --chown=ray:users {folder} /home/ray/lgd_ray/{folder}" in text and f"!{folder}/" in ignore


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_autoscaler_yaml_is_valid_and_runs_the_project_image(name):
    text = (CLUSTERS / name).read_text()
    raw = yaml.safe_load(text)
    validate_config(prepare_config(raw))
    broken = {**raw, "no_such_key": 1}
    with pytest.raises(Exception, match="no_such_key"):
        validate_config(prepare_config(broken))
    # the project image of this version, not Ray's bare image; nothing installed at node start
    image = raw["docker"]["image"]
    assert not image.startswith("rayproject/") and image.endswith(f"/lgd-ray:{PYPROJECT['project']['version']}")
    commands = [c for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                            "worker_setup_commands") for c in raw[k]]
    assert not any("pip install" in c for c in commands) and raw["file_mounts"] == {}
    # the dashboard on the head's loopback only; nothing open to the world (SSH from the user's CIDR only)
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"]) and "0.0.0.0" not in text
    _check_token_auth(raw)
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}
    gpu_types = set()
    cuda = _dockerfile_args()["CUDA_TAG"]
    for n, t in types.items():
        node = t["node_config"]
        if raw["provider"]["type"] == "aws":  # a current GPU AMI (driver for the image's CUDA), never Ray's default
            assert node["ImageId"].startswith(DLAMI) or re.match(r"ami-[0-9a-f]{17}$", node["ImageId"])
            # a security group the user made (SSH from their CIDR): Ray's own opens SSH to 0.0.0.0/0
            assert node["SecurityGroupIds"] == types[head]["node_config"]["SecurityGroupIds"]
            # roles of this cluster's, never Ray's broad default head role
            assert node["IamInstanceProfile"]["Name"] == ("lgd-ray-head" if n == head else "lgd-ray-worker")
        else:
            source = node["disks"][0]["initializeParams"]["sourceImage"]
            assert source.startswith("projects/deeplearning-platform-release/global/images/family/common-" + cuda)
            # the cluster's own network and firewall tag (the default network lets SSH in from anywhere)
            (nic,) = node["networkInterfaces"]
            assert nic["network"].endswith("/networks/lgd-ray") and node["tags"]["items"] == ["lgd-ray"]
            (account,) = node["serviceAccounts"]  # the head's own account, not Ray's project-wide default
            assert account["email"].startswith("lgd-ray-head@" if n == head else "lgd-ray@")
        if n == head:
            continue
        # declared, so the autoscaler launches GPU nodes for GPU demand and a pinned accelerator picks its type
        res = t["resources"]
        assert res["GPU"] >= 1 and res["CPU"] >= 1 and t["min_workers"] == 0 < t["max_workers"]
        kinds = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        assert len(kinds) == 1
        gpu_types.add(kinds[0])
        if raw["provider"]["type"] == "aws":  # bucket access for the workers
            assert node["IamInstanceProfile"]["Name"]
        else:
            assert any("cloud-platform" in s or "devstorage" in s for a in node["serviceAccounts"] for s in a["scopes"])
    assert "H100" in gpu_types
    documented = _distill_commands(text)
    assert documented
    for argv in documented:
        _check_command(argv, gpu_types)


def _check_token_auth(raw: dict):
    """Every process of every node (one image, one `docker run`) runs with RAY_AUTH_MODE=token and reads the token
    from a file that each node's host fetched from the provider's secret store before the container started."""
    options = raw["docker"]["run_options"]
    assert "--env=RAY_AUTH_MODE=token" in options
    (path,) = [o.split("=", 2)[2] for o in options if o.startswith("--env=RAY_AUTH_TOKEN_PATH=")]
    (volume,) = [o for o in options if o.startswith("--volume=") and f":{path}:" in o]
    assert volume.endswith(":ro")
    host_path = volume.removeprefix("--volume=").split(":")[0]
    fetch = [c for c in raw["initialization_commands"] if "auth_token" in c]  # run on every node, head and workers
    assert len(fetch) == 1 and "umask 077" in fetch[0] and host_path.endswith(fetch[0].split("> ~")[1].split(")")[0])
    assert re.search(r"aws secretsmanager get-secret-value|gcloud secrets versions access", fetch[0])
    assert not any(k.startswith("RAY_AUTH_TOKEN=") for o in options for k in [o.removeprefix("--env=")])


def test_readme_cluster_commands_use_shared_uris():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run on a cluster"):]
    section = section[:section.index("\n## ", 1)]
    commands = [c for c in _distill_commands(section) if "--dry-run" not in c]
    assert len(commands) >= 3  # AWS, GCP, Kubernetes
    for argv in commands:
        _check_command(argv, {"H100", "A100"})
    for step in ("docker build -f clusters/Dockerfile", "docker push", "python -m lgd_ray.prior stage",
                 "python -m lgd_ray.prepare", "ray up clusters/aws.yaml", "ray up clusters/gcp.yaml",
                 "kubectl apply -f clusters/kuberay-rayjob.yaml", "--dry-run"):
        assert step in section, step


def test_kuberay_rayjob_is_what_the_operator_reads():
    job, policy = yaml.safe_load_all((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert spec["backoffLimit"] >= 1  # a failed attempt is retried on a new RayCluster, resuming the run
    assert argv[:4] == ["python", "-m", "lgd_ray.distill", "imagenet1k"]
    _check_command(argv, {"H100"})
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _dockerfile_args()["RAY_VERSION"]
    head = cluster["headGroupSpec"]
    # the operator and the submitter reach the dashboard through the head Service: bound on the pod network, the
    # Service internal, and a NetworkPolicy in front of the head
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0" and head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    templates = [head["template"], spec["submitterPodTemplate"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    # the policy covers every pod of the job (a worker's ports are as open as the head's)
    assert all(selector.items() <= t["metadata"]["labels"].items() for t in templates)
    rules = policy["spec"]["ingress"]
    submitter_labels = spec["submitterPodTemplate"]["metadata"]["labels"]
    assert any(all(f.get("podSelector", {}).get("matchLabels", {"-": "-"}).items() <= submitter_labels.items()
                   for f in r["from"]) for r in rules)
    # token auth: the operator knows the Secret; every container (head, workers, submitter) has the mode and the
    # token from that Secret, none has a literal token
    assert cluster["authOptions"]["mode"] == "token"
    secret = cluster["authOptions"]["secretName"]
    for t in templates:
        (container,) = t["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}
        assert t["spec"]["securityContext"]["runAsNonRoot"] is True  # the image's user `ray`, never root
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    operator = [r for r in rules if any("namespaceSelector" in f for f in r["from"])]
    assert operator and {p["port"] for r in operator for p in r["ports"]} >= {8265}
    image = head["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f"/lgd-ray:{PYPROJECT['project']['version']}")
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["image"] == image
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        container = pod["containers"][0]
        assert container["image"] == image
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HOME"] and "expandable_segments" in env["PYTORCH_CUDA_ALLOC_CONF"]
        shm = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"}
        assert any(v["name"] in shm and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if group["minReplicas"] < group["maxReplicas"]:
            assert cluster["enableInTreeAutoscaling"] is True
        assert "accelerator_type:H100" in group["rayStartParams"]["resources"]
