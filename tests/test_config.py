import subprocess
import sys

import pytest

from lgd_ray.config import ConfigError, config_hash, load_config, to_dict


def test_defaults_and_overrides():
    cfg = load_config("digits", ["guidance.omega=0.25", "guidance.lambda=0.3", "out=runs/x"])
    assert cfg.guidance.omega == 0.25 and cfg.guidance.lambda_ == 0.3 and cfg.out == "runs/x"
    assert to_dict(cfg)["guidance"]["lambda"] == 0.3  # YAML spelling of the keyword field
    assert config_hash(cfg) != config_hash(load_config("digits"))


@pytest.mark.parametrize("override, words", [
    ("guidance.omgea=1", ["unknown key 'guidance.omgea'", "did you mean 'guidance.omega'"]),
    ("guidance.kappa=two", ["'guidance.kappa' must be int", "'two'"]),
    ("guidance.kappa=0", ["'guidance.kappa' must be >= 1"]),
    ("guidance.through=unet", ["'guidance.through' must be one of", "denoiser"]),
    ("guidance.window=[40,10]", ["'guidance.window'", "lo <= hi"]),
    ("student.model=vgg", ["'student.model'", "convnet<D>"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("digits", [override])
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_config_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_config("digit")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lgd_ray.distill", *args], capture_output=True, text=True, timeout=120)


def test_cli_one_line_errors(tmp_path):
    r = _cli("digits", "guidance.omgea=1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: config: unknown key 'guidance.omgea' (did you mean 'guidance.omega'?)"]
    # A missing data set fails before any work, naming the package and the key to set.
    r = _cli("fashion-mnist", f"data.root={tmp_path}", f"out={tmp_path / 'run'}")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "apt-get install dataset-fashion-mnist" in line and "data.root" in line
    assert not (tmp_path / "run").exists()


def test_run_identity_leaves_out_resources_and_the_guidance_batch():
    """The run folder's identity (its default name, --resume's check, the pooling of seeds) is what decides the images:
    not where they were made, nor how many trajectories a guided backward took (sized by the GPU, halved on
    out-of-memory; every term of the step is per image)."""
    from lgd_ray.config import run_dir, run_identity

    base = load_config("imagenet1k")
    same = [load_config("imagenet1k", extra) for extra in (["guidance.batch=7"], ["guidance.batch=0"],
                                                           ["ray.actors=3", "ray.num_cpus_per_actor=2"])]
    assert {config_hash(run_identity(c)) for c in same} == {config_hash(run_identity(base))}
    assert len({run_dir(c).path for c in same + [base]}) == 1
    for other in (["guidance.lambda=1"], ["ray.train_workers=2"], ["seed=1"]):
        assert config_hash(run_identity(load_config("imagenet1k", other))) != config_hash(run_identity(base))
