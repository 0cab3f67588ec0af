"""Prior training: step-seeded and resumable in plain PyTorch, on Ray Train with 1 and 2 DDP workers, and a fit whose
driver is killed mid-way continuing from its newest checkpoint (in this process and on Ray Train)."""
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import ray
import torch
from diffusers import DDPMScheduler

from conftest import kill_when
from lgd_ray.checkpoints import read_checkpoint
from lgd_ray.config import ConfigError, load_config
from lgd_ray.data import load_split
from lgd_ray.prior import load_prior, prior_checkpoints, prior_dir
from lgd_ray.prior_make import ensure_prior, project_job
from lgd_ray.prior_fit import denoising_loss, loss_weights
from lgd_ray.ray_train import ray_fitter
from lgd_ray.train import in_process_fitter

PRIOR = ["prior.depth=2", "prior.num_heads=2", "prior.head_dim=32", "prior.batch_size=64", "prior.train_steps=150",
         "prior.checkpoint_steps=50", "ray.train_cpus_per_worker=1"]  # two DDP workers on the 2 cores


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]  # Ray Train fits


def _cfg(cache, *more):
    return load_config("digits", PRIOR + [f"cache={cache}", *more])


def test_a_resumed_fit_equals_the_uninterrupted_fit(tmp_path):
    cfg = _cfg(tmp_path, "prior.train_steps=120", "prior.checkpoint_steps=40", "prior.min_snr_gamma=5")
    job = project_job(cfg, partial(load_split, cfg.data, "train"), 10)
    states = {}
    whole, metrics = job.run(on_round=lambda r, m, state: states.__setitem__(r, state()))
    assert sorted(states) == [0, 1, 2] and states[1]["step"] == 80 and metrics["step"] == 120
    resumed, _ = job.run(resume=states[0])
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    noise = DDPMScheduler.from_config(job.noise)
    w = loss_weights(noise.alphas_cumprod, torch.tensor([0, 100, 999]), 5.0)
    assert w[0] < 0.01 and 0.4 < w[1] < 0.7 and w[2] == 1  # SNR about 1e4 at t=0, 9 at t=100, below 5 after t=150


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same recipe and global batch fitted in this process, on 1 Ray Train worker and on 2 (DDP, 32 samples each):
    name -> the saved prior's weights."""
    root, weights = tmp_path_factory.mktemp("priors"), {}
    for name, workers in (("in-process", 1), ("ray-1", 1), ("ray-2", 2)):
        cfg = _cfg(root / name, f"ray.train_workers={workers}")
        ensure_prior(cfg, fitter=in_process_fitter() if name == "in-process" else ray_fitter(cfg, root))
        info = json.loads((prior_dir(cfg) / "train_info.json").read_text())
        assert info["steps"] == 150 and info["workers"] == workers
        assert not prior_checkpoints(cfg).exists()  # the checkpoints go once the prior is saved
        weights[name] = load_prior(str(prior_dir(cfg)), "ddpm").transformer
    return weights


def test_prior_on_ray_train_one_and_two_workers(uninterrupted):
    """The unweighted denoising loss of the three priors on the same fixed draws agrees within 10 %."""
    train = load_split(_cfg("unused").data, "train")
    noise = DDPMScheduler.from_config(project_job(_cfg("unused"), None, 10).noise)
    losses = {name: denoising_loss(model, train, noise, 7) for name, model in uninterrupted.items()}
    print(f"\ndenoising loss of the prior: {losses}")
    assert all(abs(loss / losses["in-process"] - 1) < 0.1 for loss in losses.values())
    one, two = (uninterrupted[n].state_dict() for n in ("ray-1", "ray-2"))
    assert not all(torch.equal(one[k], two[k]) for k in one)  # two ranks drew other batches: another fit


@pytest.mark.parametrize("where", ["in-process", "ray"])
def test_a_killed_prior_fit_continues_from_its_checkpoint(where, tmp_path, uninterrupted):
    cfg = _cfg(tmp_path / "killed")
    args = [sys.executable, "-m", "lgd_ray.prior", "digits", *PRIOR, f"cache={cfg.cache}"]
    args += ([f"ray.address={ray.get_runtime_context().gcs_address}"] if where == "ray" else ["ray.enabled=false"])

    def checkpointed():  # the fit has left a checkpoint (and is not done)
        return any(c.name.startswith("checkpoint_") and (c / "progress.json").exists()
                   for run in prior_checkpoints(cfg).iterdir() for c in run.iterdir())

    kill_when(args, checkpointed, "no checkpoint", timeout=180)
    assert not (prior_dir(cfg) / "model_index.json").exists()
    first_sitting = max(read_checkpoint(Path(c.local_path))["seconds"] for run in prior_checkpoints(cfg).iterdir()
                        for c in run.iterdir() if (c / "progress.json").exists())
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    said = [line for line in r.stdout.splitlines() if "continu" in line]
    assert said and ("continued an earlier fit (resumed after step" in said[-1] or "continuing from" in said[-1])
    resumed = load_prior(str(prior_dir(cfg)), "ddpm").transformer.state_dict()
    whole = uninterrupted["ray-1" if where == "ray" else "in-process"].state_dict()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # as if never interrupted (the CPU)
    info = json.loads((prior_dir(cfg) / "train_info.json").read_text())
    assert info["steps"] == 150 and info["seconds"] > first_sitting > 0  # the time of both sittings
    assert not prior_checkpoints(cfg).exists()


def test_prior_fit_keys_checkpointing_and_autocast(tmp_path):
    """prior.checkpointing gives the same weights as the plain fit (the same arithmetic, recomputed); prior.autocast
    bfloat16 fits too (its loss falls), and is part of the prior's identity (its own cache folder)."""
    plain, ckpt, bf16 = (load_config("digits", [f"cache={tmp_path}", "prior.train_steps=20", "prior.checkpoint_steps=20",
                                                "prior.batch_size=16", "prior.depth=2", *more])
                         for more in ([], ["prior.checkpointing=true"], ["prior.autocast=bfloat16"]))
    fit = lambda cfg: project_job(cfg, partial(load_split, cfg.data, "train"), 10).run("cpu")
    (w_plain, _), (w_ckpt, _), (_, m_bf16) = fit(plain), fit(ckpt), fit(bf16)
    assert all(torch.allclose(w_plain[k], w_ckpt[k], atol=1e-6) for k in w_plain)
    assert m_bf16["final_loss"] < 1.0 and prior_dir(bf16) != prior_dir(plain) == prior_dir(ckpt)


def test_prior_width_depth_patch_and_compile_keys_each_fit(tmp_path):
    """prior.head_dim (width), depth, patch_size and compile: each a tiny fit whose DiT has that shape, whose
    denoising loss falls, and whose prior has its own cache folder; compile gives the plain fit's weights up to float
    order; bad values are one line."""
    base = [f"cache={tmp_path}", "prior.train_steps=40", "prior.checkpoint_steps=40", "prior.batch_size=16",
            "prior.depth=2", "prior.num_heads=2"]
    train = load_split(load_config("digits").data, "train")

    def fit(cfg):
        """(EMA weights, denoising loss before, after) on fixed draws."""
        job = project_job(cfg, lambda: train, 10)
        torch.manual_seed(job.seed)
        model, noise = job.build(), DDPMScheduler.from_config(job.noise)
        before = denoising_loss(model, train, noise, 7, n=256)
        weights, _ = job.run("cpu")
        model.load_state_dict(weights)
        return weights, before, denoising_loss(model, train, noise, 7, n=256)

    plain = load_config("digits", base)
    w_plain, *_ = fit(plain)
    folders = {str(prior_dir(plain))}
    for key, value, check in (("head_dim", 64, lambda m: m.inner_dim == 128),
                              ("depth", 3, lambda m: len(m.transformer_blocks) == 3),
                              ("patch_size", 2, lambda m: m.pos_embed.height == 4),
                              ("compile", "true", lambda m: True)):
        cfg = load_config("digits", base + [f"prior.{key}={value}"])
        assert check(project_job(cfg, None, 10).build()), key
        weights, before, after = fit(cfg)
        assert after < 0.7 * before, (key, before, after)
        folders.add(str(prior_dir(cfg)))
    assert len(folders) == 5  # each key is part of the prior's identity
    assert all(torch.allclose(w_plain[k], weights[k], atol=1e-3) for k in w_plain)  # compile: the same fit
    with pytest.raises(ConfigError, match="'prior.patch_size' 3 must divide the DiT's input size 8"):
        project_job(load_config("digits", base + ["prior.patch_size=3"]), None, 10).build()
    with pytest.raises(ConfigError, match="'prior.head_dim' must be >= 8"):
        load_config("digits", base + ["prior.head_dim=4"])
