import json

import pytest
import torch
from diffusers import DiTPipeline

from lgd_ray.config import ConfigError, load_config
from lgd_ray.prior import load_prior
from lgd_ray.sampler import sample
from lgd_ray.seeding import generator


def test_folder_loads_like_a_hub_id_and_samples(latent_pipeline_dir):
    prior = load_prior(str(latent_pipeline_dir))  # the same call takes "facebook/DiT-XL-2-256" on a cluster
    assert prior.vae is not None and prior.num_classes == 1000 and prior.null_class == 1000
    assert prior.transformer.config.out_channels == 2 * prior.latent_shape[0]  # learned sigma
    assert prior.image_size == 16 and not prior.transformer.training
    z, _ = sample(prior, torch.tensor([1, 999]), [generator(0, i) for i in range(2)], num_steps=4, cfg_scale=4.0)
    with torch.no_grad():
        images = prior.decode(z)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_ddpm_step_variance_is_the_configs(latent_pipeline_dir):
    """prior.variance sets DDPM's step noise (a learned-sigma DiT's variance channels are dropped either way): from the
    same x and seeds, one step differs only by the noise's scale, sqrt(beta) (fixed_large) against sqrt(beta-tilde)
    (fixed_small, DiTPipeline's and the default)."""
    labels, gens = torch.tensor([1, 2, 3, 4]), lambda: [generator(3, i) for i in range(4)]
    x = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens()])
    noise = x  # the step's noise: the first draw of fresh generators, as x's was
    steps = {}
    for variance in ("fixed_small", "fixed_large"):
        prior = load_prior(str(latent_pipeline_dir), "ddpm", variance=variance)
        assert prior.scheduler.config.variance_type == variance
        steps[variance] = sample(prior, labels, gens(), num_steps=4, cfg_scale=1.0, x=x, first=3, last=3)[0]
    sched = load_prior(str(latent_pipeline_dir), "ddpm").scheduler
    assert sched.config.variance_type == "fixed_small"  # the default
    sched.set_timesteps(4)
    a, a_prev = sched.alphas_cumprod[sched.timesteps[0]], sched.alphas_cumprod[sched.timesteps[1]]
    beta = 1 - a / a_prev
    beta_tilde = (1 - a_prev) / (1 - a) * beta
    expected = (beta.sqrt() - beta_tilde.sqrt()) * noise
    assert torch.allclose(steps["fixed_large"] - steps["fixed_small"], expected, atol=1e-5)
    assert expected.abs().max() > 0.01


def test_bad_model_id_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot load a diffusers pipeline"):
        load_prior(str(tmp_path / "nowhere"))


def test_matches_diffusers_dit_pipeline(latent_pipeline_dir):
    """Guidance off, the sampler reproduces DiTPipeline (CFG 4.0, same DiT, noise and scheduler)."""
    labels = [3, 999, 0, 512]
    steps = 8
    pipe = DiTPipeline.from_pretrained(latent_pipeline_dir)
    prior = load_prior(str(latent_pipeline_dir), "ddim")
    pipe.set_progress_bar_config(disable=True)
    gens = [generator(7, "noise", 0, c, 0, 0) for c in labels]
    ref = pipe(class_labels=labels, guidance_scale=4.0, generator=gens, num_inference_steps=steps, output_type="pt").images
    gens = [generator(7, "noise", 0, c, 0, 0) for c in labels]
    z, _ = sample(prior, torch.tensor(labels), gens, steps, 4.0)
    with torch.no_grad():
        ours = (prior.decode(z) / 2 + 0.5).clamp(0, 1)
    assert (ours - ref).abs().max().item() < 1e-4


def test_pixel_prior_saved_with_save_pretrained(trained, tiny_cfg):
    from lgd_ray.prior import prior_dir

    prior, *_ = trained
    folder = prior_dir(tiny_cfg)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == [None, None] and prior.vae is None
    assert prior.num_classes == 10 and prior.null_class == 10
    emb = prior.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert emb.num_embeddings == 11  # the null class row exists: classifier-free guidance works
    assert json.loads((folder / "train_info.json").read_text())["steps"] == tiny_cfg.prior.train_steps


def test_a_fixed_prior_seed_shares_one_prior_across_run_seeds(trained, tiny_cfg, tiny_overrides):
    """prior.seed -1 trains one prior per run seed; a fixed prior.seed reuses the prior of that seed (not retrained)."""
    from lgd_ray.config import load_config
    from lgd_ray.prior import prior_dir
    from lgd_ray.prior_make import ensure_prior

    own = load_config("digits", tiny_overrides + ["seed=1"])
    shared = load_config("digits", tiny_overrides + ["seed=1", f"prior.seed={tiny_cfg.seed}"])
    assert str(prior_dir(own)) != str(prior_dir(tiny_cfg))
    info = (prior_dir(tiny_cfg) / "train_info.json").read_text()
    assert ensure_prior(shared) == str(prior_dir(tiny_cfg))
    assert (prior_dir(tiny_cfg) / "train_info.json").read_text() == info and not prior_dir(own).exists()


def test_prior_command(trained, tiny_cfg, tiny_overrides):
    import subprocess
    import sys

    from lgd_ray.prior import prior_dir

    r = subprocess.run([sys.executable, "-m", "lgd_ray.prior", "digits", *tiny_overrides], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == str(prior_dir(tiny_cfg))  # cached: not retrained
    r = subprocess.run([sys.executable, "-m", "lgd_ray.prior", "digits", "prior.model_id=facebook/DiT-XL-2-256"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: config: 'prior.model_id' is set: that prior is loaded, not trained (unset it to train)"]


def test_latent_prior_in_bfloat16(latent_pipeline_dir):
    """A latent DiT and VAE in bfloat16 sample, decode and carry a guidance gradient with float32 in and out."""
    from lgd_ray.guidance import Guide, Scorer
    from lgd_ray.models import build_classifier

    full = load_prior(str(latent_pipeline_dir), "ddim")
    half = load_prior(str(latent_pipeline_dir), "ddim", dtype="bfloat16")
    assert half.vae.dtype == torch.bfloat16
    labels = torch.tensor([3, 999])
    with torch.no_grad():
        a, b = (p.decode(sample(p, labels, [generator(0, i) for i in range(2)], 4, 4.0)[0]) for p in (full, half))
    assert b.dtype == torch.float32 and (a - b).norm() / a.norm() < 0.05  # 0.013 here
    nets = [build_classifier("convnet2", 3, 16, 1000, seed=s).requires_grad_(False) for s in (0, 1)]
    guide = Guide(Scorer(*nets, omega=1.0), 0.1, 0.0, (0, 3), "decoder", 1.0, 16)
    x, t = torch.randn(2, *half.latent_shape), torch.tensor(500)
    eps = guide.eps(half, x, t, labels.tolist(), 4.0)
    with torch.no_grad():
        plain = half.eps(x, t, labels, 4.0)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all() and not torch.equal(eps, plain)


def test_a_packaged_prior_is_installed_instead_of_trained(trained, tiny_cfg, tiny_overrides, tmp_path, monkeypatch):
    """`python -m lgd_ray.prior CONFIG --package` ships the made prior's EMA weights (safetensors + sha256 and the
    command); a cache without the prior gets it from there, not from a fit; weights that changed are one line."""
    from dataclasses import replace

    from lgd_ray import prior_make
    from lgd_ray.prior import prior_dir

    monkeypatch.setattr(prior_make, "PACKAGED", tmp_path / "priors")
    shipped = prior_make.package_prior(tiny_cfg, "python -m lgd_ray.prior digits ...")
    meta = json.loads(shipped.with_suffix(".json").read_text())
    assert shipped.stat().st_size < 10e6 and meta["train_info"]["steps"] == tiny_cfg.prior.train_steps
    fresh = replace(tiny_cfg, cache=str(tmp_path / "cache"))
    assert prior_dir(fresh).name == prior_dir(tiny_cfg).name  # the same prior's folder, in another cache
    monkeypatch.setattr(prior_make, "train_prior", None)  # a fit would fail
    installed = load_prior(prior_make.ensure_prior(fresh), tiny_cfg.prior.scheduler)
    made = trained[0].transformer.state_dict()
    assert all(torch.equal(installed.transformer.state_dict()[k], made[k]) for k in made)
    assert json.loads((prior_dir(fresh) / "train_info.json").read_text())["sha256"] == meta["sha256"]
    shipped.write_bytes(shipped.read_bytes()[:-1] + b" ")
    with pytest.raises(ConfigError, match=r"has sha256 \w+, not the \w+ recorded beside it"):
        prior_make.ensure_prior(replace(tiny_cfg, cache=str(tmp_path / "other")))


def test_fashion_mnist_default_prior_is_the_shipped_one(tmp_path):
    """configs/fashion-mnist.yaml's prior is the one in lgd_ray/priors/ (so `distill fashion-mnist` installs it, no
    2.5-h fit): weights under 10 MB, their sha256 as recorded, loaded through the cache path into a working DiT."""
    from lgd_ray import prior_make
    from lgd_ray.prior import prior_dir

    cfg = load_config("fashion-mnist", [f"cache={tmp_path}"])
    shipped = prior_make.PACKAGED / f"{prior_dir(cfg).name}.safetensors"
    meta = json.loads(shipped.with_suffix(".json").read_text())
    assert shipped.stat().st_size < 10e6 and meta["train_info"]["steps"] == cfg.prior.train_steps == 30000
    pipe = load_prior(prior_make.ensure_prior(cfg), cfg.prior.scheduler)
    assert json.loads((prior_dir(cfg) / "train_info.json").read_text())["sha256"] == meta["sha256"]
    with torch.no_grad():
        out = pipe.transformer(torch.zeros(2, 1, 28, 28), timestep=torch.tensor([500, 500]),
                               class_labels=torch.tensor([0, 9])).sample
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()
