"""Making a prior: the project's pixel DiT trained from scratch on the config's data, or `prior.base` fine-tuned on a
folder data set's classes (lgd_ray/finetune.py), each a fit in this process or on Ray Train, saved with
`save_pretrained` (to `cache`, a folder or a URI) so that it loads through `load_prior` exactly as
`facebook/DiT-XL-2-256` does; and staging a hub pipeline to a store once.

    python -m lgd_ray.prior CONFIG [key=value ...]     make the config's prior (skipped if made)
    python -m lgd_ray.prior CONFIG ... --package       and ship its EMA weights (and a latent prior's VAE) in lgd_ray/priors/
    python -m lgd_ray.prior stage HUB_ID_OR_FOLDER URI  copy a DiT pipeline to a store
"""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
from functools import partial
from pathlib import Path
from typing import Callable

from diffusers import DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel
from safetensors.torch import load

from lgd_ray.cli import Parser, one_line_errors, run_cli
from lgd_ray.config import Config, ConfigError
from lgd_ray.data import TensorSet, check_data, load_split, num_classes
from lgd_ray.finetune import base_vae, cache_latents, finetune_prior, read_latents
from lgd_ray.lease import cache_lock
from lgd_ray.gpu_memory import check_fit_fits
from lgd_ray.prior import PIPELINE_MARKER, prior_checkpoints, prior_dir, prior_seed, project_configs, require_prior
from lgd_ray.prior_fit import PriorJob, save_prior, train_prior
from lgd_ray.seeding import derive_seed
from lgd_ray.storage import Location
from lgd_ray.train import Fitter, in_process_fitter, process_device
from lgd_ray.vae_fit import VAE_MARKER, build_vae, ensure_vae


PACKAGED = Path(__file__).resolve().parent / "priors"  # shipped priors: <cache folder name>.safetensors and .json
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"  # a saved prior's DiT (EMA) weights
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"  # and a latent prior's VAE


def build_project_dit(cfg: Config, n_classes: int) -> DiTTransformer2DModel:
    """The project's own DiT of `cfg` (pixel or latent) for n_classes classes, randomly initialised."""
    return DiTTransformer2DModel(**project_configs(cfg, n_classes)[0])


def project_job(cfg: Config, load_data: Callable[[], TensorSet], n_classes: int) -> PriorJob:
    """The fit of the project's DiT on `load_data()` (uint8 images, or scaled latents), linear-beta DDPM noise, x0
    clipped to [-1, 1] in pixel space only."""
    noise = DDPMScheduler(num_train_timesteps=cfg.prior.train_timesteps, beta_schedule="linear",
                          clip_sample=not cfg.prior.latent_channels)
    return PriorJob(prior=cfg.prior, build=partial(build_project_dit, cfg, n_classes), load_data=load_data,
                    noise=dict(noise.config), seed=derive_seed(prior_seed(cfg), "prior"),
                    checkpoints=str(prior_checkpoints(cfg)))


def ensure_prior(cfg: Config, device="cpu", fitter: Fitter | None = None) -> str:
    """The prior's model id; makes and saves the project's prior first if the config needs one and it is absent:
    the pixel DiT trained, or prior.base fine-tuned on the data set's classes (with `fitter`, default in this process).

    Called by the driver only, before any actor starts (actors call `require_prior`).
    """
    if cfg.prior.model_id:
        return require_prior(cfg)
    out = prior_dir(cfg)
    if (out / PIPELINE_MARKER).exists():
        return str(out)
    with cache_lock(cfg.cache, out.name, cfg.storage.lease_s, cfg.storage.retry_s) as lease:
        if not (out / PIPELINE_MARKER).exists():  # not made by another driver while this one waited
            make_prior(cfg, out, device, fitter, lease)
    return str(out)


def make_prior(cfg: Config, out: Location, device, fitter: Fitter | None, lease):
    """Install the packaged weights or fit the prior into `out`, under the cache entry's lease."""
    if (PACKAGED / f"{out.name}.json").exists():
        lease.check()
        install_packaged(cfg, out)
    else:
        check_fit_fits(cfg, cfg.ray.train_workers or 1)  # GPU workers: the fit's memory, before any work
        fitter = lease.fenced(fitter or in_process_fitter(device))
        if cfg.prior.base:
            info = finetune_prior(cfg, out, fitter)
        elif cfg.data.name == "folder":
            raise ConfigError("config: a folder data set needs 'prior.model_id' (a DiT pipeline, e.g. "
                              "facebook/DiT-XL-2-256 for ImageNet classes) or 'prior.base' (one to fine-tune on its classes)")
        elif cfg.prior.latent_channels:
            info = make_latent_prior(cfg, out, fitter)
        else:
            print(f"prior: training a pixel DiT on {cfg.data.name} ({cfg.prior.train_steps} steps) -> {out}", flush=True)
            info = train_prior(project_job(cfg, partial(load_split, cfg.data, "train"), num_classes(cfg.data)), out,
                               fitter)
        print(f"prior: {info['params'] / 1e6:.2f} M params, loss {info['final_loss']:.4f} (unweighted, fixed draws "
              f"{info['eval_loss']:.4f}), {info['seconds']} s", flush=True)


def make_latent_prior(cfg: Config, out: Location, fitter: Fitter) -> dict:
    """The project's latent prior: its VAE fitted (or found in the cache), the train split encoded with it once, and
    the latent DiT fitted on those latents, saved in `out` as a DiTPipeline with that VAE; returns the DiT fit's info."""
    vae, latents = latent_data(cfg, fitter)
    print(f"prior: training a latent DiT on {cfg.data.name}'s latents ({cfg.prior.train_steps} steps) -> {out}",
          flush=True)
    job = project_job(cfg, partial(read_latents, latents), num_classes(cfg.data))
    return train_prior(job, out, fitter, vae=base_vae(str(vae), cfg.local_cache, VAE_MARKER))


def latent_data(cfg: Config, fitter: Fitter) -> tuple[Location, Location]:
    """The config's VAE folder (fitted with `fitter` first if it is not in the cache) and the train split's latents
    under it (encoded once, cached)."""
    vae = ensure_vae(cfg, fitter)
    return vae, cache_latents(cfg, cfg.data.image_size, str(vae), VAE_MARKER)


def _parts(cfg: Config) -> dict[str, tuple[str, str]]:
    """What a shipped prior holds: its JSON's sha256 key -> (file name suffix in lgd_ray/priors/, file in the
    pipeline): the DiT's EMA weights, and a latent prior's VAE."""
    return {"sha256": ("", WEIGHTS), **({"vae_sha256": ("-vae", VAE_WEIGHTS)} if cfg.prior.latent_channels else {})}


def package_prior(cfg: Config, command: str) -> Path:
    """Ship the config's made prior (pixel, or latent with its VAE) with lgd_ray: the DiT's EMA weights as
    lgd_ray/priors/<cache folder>.safetensors (a latent prior's VAE as <cache folder>-vae.safetensors) and a JSON of
    their sha256, the VAE's latent scale, the command that made them and the fit's info."""
    out = prior_dir(cfg)
    if cfg.prior.base or not (out / PIPELINE_MARKER).exists():
        raise ConfigError(f"prior: no project prior of this config at {out} to package: make it first")
    PACKAGED.mkdir(exist_ok=True)
    meta = {"command": command, "train_info": json.loads((out / "train_info.json").read_text())}
    for key, (suffix, weights) in _parts(cfg).items():
        data = (out / weights).read_bytes()
        (PACKAGED / f"{out.name}{suffix}.safetensors").write_bytes(data)
        meta[key] = hashlib.sha256(data).hexdigest()
        print(f"prior: {out / weights} -> {PACKAGED / out.name}{suffix}.safetensors ({len(data) / 1e6:.1f} MB, "
              f"sha256 {meta[key]})", flush=True)
    if cfg.prior.latent_channels:
        meta["vae_scaling_factor"] = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
    (PACKAGED / f"{out.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return PACKAGED / f"{out.name}.safetensors"


def install_packaged(cfg: Config, out: Location):
    """Save the prior shipped in lgd_ray/priors/ for this config to `out` (its cache folder), instead of training it
    (a latent prior with its shipped VAE); weights whose sha256 is not the recorded one are refused in one line."""
    meta = json.loads((PACKAGED / f"{out.name}.json").read_text())
    shipped = {}
    for key, (suffix, _) in _parts(cfg).items():
        path = PACKAGED / f"{out.name}{suffix}.safetensors"
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta[key]:
            raise ConfigError(f"prior: {path} has sha256 {digest}, not the {meta[key]} recorded beside it: restore it "
                              "(git checkout), or delete the shipped files to train the prior")
        shipped[key] = load(data)
    vae = None
    if "vae_sha256" in shipped:
        vae = build_vae(cfg)
        vae.load_state_dict(shipped["vae_sha256"])
        vae.register_to_config(scaling_factor=meta["vae_scaling_factor"])
    info = {**meta["train_info"], "packaged": f"lgd_ray/priors/{out.name}.safetensors", "sha256": meta["sha256"]}
    save_prior(project_job(cfg, None, num_classes(cfg.data)), shipped["sha256"], info, out, vae=vae)
    print(f"prior: the packaged weights of {meta['train_info']['steps']} steps ({meta['command']}) -> {out}", flush=True)


def stage_prior(source: str, uri: str) -> Location:
    """Copy a diffusers pipeline (a hub id, downloaded once here, or a local folder) to a store, model_index.json last."""
    local = Path(source)
    if not (local / PIPELINE_MARKER).exists():
        print(f"prior: downloading {source} from the model hub", flush=True)
        local = Path(DiffusionPipeline.download(source))
    target = Location(uri)
    target.upload_dir(local, last=PIPELINE_MARKER)
    print(f"prior: {source} -> {target}", flush=True)
    return target


def main(argv: list[str]):
    if argv[:1] == ["stage"]:
        parser = Parser(prog="python -m lgd_ray.prior stage",
                                         description="Copy a DiT pipeline from the hub (or a folder) to a store, once.")
        parser.add_argument("source", help="a hub id (facebook/DiT-XL-2-256) or a local folder saved by save_pretrained")
        parser.add_argument("uri", help="where actors load it from: prior.model_id=URI")
        args = parser.parse_args(argv[1:])
        one_line_errors(lambda: stage_prior(args.source, args.uri))
        return

    def work(cfg: Config, args):
        check_data(cfg.data)
        if cfg.prior.model_id:
            raise ConfigError("config: 'prior.model_id' is set: that prior is loaded, not trained (unset it to train)")
        fitter = None
        if cfg.ray.enabled:  # on Ray Train: DDP over ray.train_workers, GPUs when ray.train_use_gpu
            # the Ray layer only when Ray is on: a ray.enabled=false run never imports ray
            from lgd_ray.cluster import connect
            from lgd_ray.ray_train import ray_fitter
            from lgd_ray.resources import resolve_auto

            connect(cfg)
            cfg = resolve_auto(cfg)
            fitter = ray_fitter(cfg, Location(cfg.cache))
        print(ensure_prior(cfg, process_device(cfg.device), fitter))
        if args.package:
            made_by = [a for a in argv if not a.startswith("cache=")]  # where this machine caches it is no recipe
            package_prior(cfg, shlex.join(["python", "-m", "lgd_ray.prior", *made_by]))

    run_cli("lgd_ray.prior", "Train the config's prior, or fine-tune prior.base on its classes (skipped if made).",
            argv, work, lambda parser: parser.add_argument(
                "--package", action="store_true", help="then ship its EMA weights (a latent prior's with its VAE) in "
                "lgd_ray/priors/ (under 10 MB: commit them; `ensure_prior` installs them into any cache instead of "
                "training)"))


if __name__ == "__main__":
    main(sys.argv[1:])
