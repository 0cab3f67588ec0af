"""The project's latent prior (issue 41): a VAE and a learned-sigma latent DiT fitted by the project, saved as a
DiTPipeline folder that diffusers itself loads, sampled by the code path of facebook/DiT-XL-2-256."""
import json
import math
from dataclasses import replace
from functools import partial

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline

from conftest import load_bench
from lgd_ray.checkpoints import write_checkpoint
from lgd_ray.config import ConfigError, load_config
from lgd_ray.data import load_split
from lgd_ray.distill import distill
from lgd_ray.prior import load_prior, project_configs
from lgd_ray.prior_fit import vlb_bits
from lgd_ray.prior_make import ensure_prior
from lgd_ray.sampler import sample
from lgd_ray.seeding import generator
from lgd_ray.shards import load_tensor_set, read_shards
from lgd_ray.tiny_decoder import load_tiny
from lgd_ray.storage import Location
from lgd_ray.vae_fit import VAE_MARKER, VaeJob, build_vae, vae_dir

LATENT = ["prior.latent_channels=4", "prior.vae_channels=[16,32]", "prior.vae_steps=40", "prior.learned_sigma=true",
          "prior.checkpoint_steps=20", "prior.train_steps=60", "prior.patch_size=2", "prior.depth=2",
          "prior.num_heads=2", "prior.num_steps=6", "prior.scheduler=ddim", "guidance.window=[0,5]"]


@pytest.fixture(scope="module")
def latent_cfg(tiny_overrides, tmp_path_factory):
    cache = tmp_path_factory.mktemp("latent-cache")
    return load_config("digits", tiny_overrides + LATENT + [f"cache={cache}", "ray.enabled=false"])


def test_the_latent_prior_is_a_dit_pipeline_that_diffusers_loads_and_the_sampler_reproduces(latent_cfg):
    folder = ensure_prior(latent_cfg)
    vae_info = json.loads((vae_dir(latent_cfg) / VAE_MARKER).read_text())
    prior = load_prior(folder, "ddim")  # the call that loads facebook/DiT-XL-2-256
    assert prior.latent_shape == (4, 4, 4) and prior.image_size == 8
    assert prior.transformer.config.out_channels == 8  # learned sigma
    assert prior.vae.config.scaling_factor == pytest.approx(vae_info["scaling_factor"])
    # its latents have about unit variance, as DiT-XL/2's VAE's do with its scaling factor
    z = prior.encode(load_split(latent_cfg.data, "train").images[:512].float() / 127.5 - 1)
    assert 0.8 < z.std().item() < 1.25

    pipe = DiTPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels, steps = [0, 3, 9], 6  # CFG off: DiTPipeline's null class is ImageNet's (1000), not this DiT's (10)
    ref = pipe(class_labels=labels, guidance_scale=1.0, generator=[generator(5, c) for c in labels],
               num_inference_steps=steps, output_type="pt").images
    x, _ = sample(prior, torch.tensor(labels), [generator(5, c) for c in labels], steps, 1.0)
    with torch.no_grad():
        ours = (prior.decode(x) / 2 + 0.5).clamp(0, 1)
    assert ref.shape == (3, 1, 8, 8) and (ours - ref).abs().max().item() < 1e-4


def test_a_distillation_runs_on_the_latent_prior(latent_cfg, tmp_path):
    """lgd's guided step back-propagates through the trained VAE decoder; the run records the prior it used."""
    manifest = distill(replace(latent_cfg, out=str(tmp_path / "run")))
    made = load_tensor_set(Location(str(tmp_path / "run")), manifest["shards"], 10, latent_cfg.data.shape)
    assert made.images.shape == (10 * 6, 1, 8, 8) and made.labels.bincount().tolist() == [6] * 10
    assert manifest["prior"] == ensure_prior(latent_cfg)
    assert manifest["stages"]["2"]["cost"]["guided_steps"] > 0


def test_the_vae_fit_resumed_from_a_checkpoint_equals_the_uninterrupted_fit(latent_cfg):
    train = load_split(latent_cfg.data, "train")
    job = VaeJob(prior=latent_cfg.prior, build=partial(build_vae, latent_cfg), load_data=lambda: train, seed=3)
    states = []
    whole, _ = job.run(on_round=lambda r, m, state: states.append(state()) if r == 0 else None)
    resumed, metrics = job.run(resume=states[0])
    assert metrics["step"] == 40 and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_vlb_term_is_zero_for_the_true_posterior_and_a_gaussian_kl_otherwise():
    noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 3, 3, generator=gen), torch.randn(6, 4, 3, 3, generator=gen)
    t = torch.tensor([1, 5, 100, 400, 800, 999])
    x_t = noise.add_noise(x0, eps, t)
    exact = vlb_bits(noise, x0, x_t, t, eps, -torch.ones_like(x0))  # the true noise and the posterior's variance
    assert exact.abs().max().item() < 1e-4
    v = torch.rand(x0.shape, generator=gen) * 2 - 1
    wrong = eps + 0.1 * torch.randn(x0.shape, generator=gen)
    got = vlb_bits(noise, x0, x_t, t, wrong, v)
    # against torch.distributions' KL of the same two Gaussians
    b, a = noise.betas[t].view(-1, 1, 1, 1), noise.alphas_cumprod[t].view(-1, 1, 1, 1)
    a_prev = noise.alphas_cumprod[t - 1].view(-1, 1, 1, 1)
    post_var = b * (1 - a_prev) / (1 - a)
    mean = lambda x0_: (b * a_prev.sqrt() * x0_ + (1 - a_prev) * (1 - b).sqrt() * x_t) / (1 - a)
    x0_hat = (x_t - (1 - a).sqrt() * wrong) / a.sqrt()
    var = torch.exp((v + 1) / 2 * b.log() + (1 - v) / 2 * post_var.log())
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean(x0), post_var.sqrt()),
                                           torch.distributions.Normal(mean(x0_hat), var.sqrt()))
    assert torch.allclose(got[1:], kl.mean(dim=(1, 2, 3))[1:] / math.log(2), rtol=1e-3, atol=1e-5)
    assert (got > 0).all()


def test_a_latent_prior_needs_a_packaged_data_set_and_a_size_its_vae_divides(tiny_overrides):
    cfg = load_config("digits", tiny_overrides + ["prior.latent_channels=4", "prior.vae_channels=[8,8,8]",
                                                  "data.image_size=14"])
    with pytest.raises(ConfigError, match="data.image_size 14 is not a multiple of 4"):
        project_configs(cfg)
    with pytest.raises(ConfigError, match="'prior.latent_channels'.*'prior.base'"):
        load_config("digits", tiny_overrides + ["prior.latent_channels=4", "prior.base=some/dit"])


def test_lgd_with_the_tiny_guidance_decoder(latent_cfg, tmp_path):
    """guidance.decoder=tiny: the driver fits the tiny decoder to the prior's VAE decoder once (cached), the guided
    steps decode x0^ with it, and the samples say so; the full decoder still writes the images."""
    cfg = replace(latent_cfg, out=str(tmp_path / "run"),
                  guidance=replace(latent_cfg.guidance, decoder="tiny", tiny_steps=60, tiny_trajectories=2))
    manifest = distill(cfg)
    info = manifest["tiny_decoder"]
    assert info["step"] == 60 and info["params"] < 500_000
    prior = load_prior(manifest["prior"])
    tiny = load_tiny(cfg, prior, manifest["prior"])
    z = prior.encode(load_split(cfg.data, "test").images[:256].float() / 127.5 - 1)  # latents it was not fitted on
    with torch.no_grad():
        target = prior.decode(z)
        assert (tiny(z) - target).pow(2).mean() < 0.5 * (target - target.mean()).pow(2).mean()  # it learned something
    rows = [r for r in manifest["shards"] if r["stage"] > 0]
    records = read_shards(Location(cfg.out), rows)
    assert records and all(r["meta"]["params"]["decoder"] == "tiny" for r in records)


def test_the_tiny_decoder_needs_a_latent_prior(tiny_overrides, trained, tmp_path):
    cfg = load_config("digits", tiny_overrides + ["guidance.decoder=tiny", "ray.enabled=false", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="has no VAE"):
        distill(cfg)


def test_a_latent_prior_is_packaged_with_its_vae_and_installed_instead_of_trained(latent_cfg, tmp_path, monkeypatch):
    """`--package` ships a latent prior's DiT and its VAE (and the VAE's latent scale); a cache without the prior gets
    the same pipeline from them, without a fit; a changed VAE file is one line."""
    from lgd_ray import prior_make
    from lgd_ray.prior import prior_dir

    made = load_prior(ensure_prior(latent_cfg), "ddim")
    monkeypatch.setattr(prior_make, "PACKAGED", tmp_path / "priors")
    shipped = prior_make.package_prior(latent_cfg, "python -m lgd_ray.prior ...")
    meta = json.loads(shipped.with_suffix(".json").read_text())
    vae_file = shipped.with_name(shipped.stem + "-vae.safetensors")
    assert vae_file.exists() and meta["vae_scaling_factor"] == pytest.approx(made.vae.config.scaling_factor)
    fresh = replace(latent_cfg, cache=str(tmp_path / "cache"))
    monkeypatch.setattr(prior_make, "make_latent_prior", None)  # a fit would fail
    installed = load_prior(prior_make.ensure_prior(fresh), "ddim")
    for got, want in ((installed.transformer, made.transformer), (installed.vae, made.vae)):
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    assert installed.vae.config.scaling_factor == made.vae.config.scaling_factor
    assert prior_dir(fresh).name == prior_dir(latent_cfg).name
    vae_file.write_bytes(vae_file.read_bytes()[:-1] + b" ")
    with pytest.raises(ConfigError, match=r"-vae.safetensors has sha256 \w+, not the \w+ recorded beside it"):
        prior_make.ensure_prior(replace(latent_cfg, cache=str(tmp_path / "other")))


def test_a_latent_fits_checkpoint_is_exported_with_its_vae_for_the_fidelity_curve(latent_cfg, tiny_overrides,
                                                                                    tmp_path):
    """bench/prior_curve.py on a latent prior: a checkpoint's EMA weights saved as a pipeline with the config's fitted
    VAE, so that it samples images, not latents (here the finished fit's weights as the checkpoint); its curve has the
    VAE's round trip of real images as a second floor."""
    folder = ensure_prior(latent_cfg)
    made = load_prior(folder)
    checkpoint = tmp_path / "checkpoint_000002"
    checkpoint.mkdir()
    write_checkpoint(checkpoint, {"ema": made.transformer.state_dict(), "step": 60}, 2)
    step, exported = load_bench("prior_curve").export(latent_cfg, checkpoint, tmp_path / "curve")
    prior = load_prior(str(exported))
    assert step == 60 and prior.vae is not None and prior.image_size == made.image_size
    for a, b in ((prior.transformer, made.transformer), (prior.vae, made.vae)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert prior.vae.config.scaling_factor == made.vae.config.scaling_factor
    load_bench("prior_curve").main(["digits", str(checkpoint), *tiny_overrides, *LATENT, f"cache={latent_cfg.cache}",
                                    "ray.enabled=false", "--out", str(tmp_path / "curve"), "--per-class", "8"])
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    real, round_trip = curve["floors"]
    assert (real["setting"], round_trip["setting"]) == ("real train vs real test", "real train through the VAE vs real test")
    assert round_trip["fd"] > real["fd"] and [r["steps"] for r in curve["rows"]] == [60]  # the VAE loses detail
