"""The diffusion prior: a diffusers DiT pipeline (transformer, optional VAE, scheduler) loaded from a hub id, a
folder or a store URI, and the project's own pixel-space class-conditional DiT for small data sets.

`python -m lgd_ray.prior CONFIG [key=value ...]` makes the prior of a config (the pixel DiT trained from scratch, or
`prior.base` fine-tuned on a folder data set's classes, on Ray Train when ray.enabled) and saves it with
`save_pretrained` (to `cache`, a folder or a URI), so it loads through `load_prior` exactly as
`facebook/DiT-XL-2-256` does. `python -m lgd_ray.prior stage HUB_ID URI` copies a hub pipeline to a store once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel

from lgd_ray.cli import one_line_errors, run_cli
from lgd_ray.config import Config, ConfigError, PriorConfig, config_hash
from lgd_ray.data import TensorSet, check_data, load_split, num_classes
from lgd_ray.prior_fit import PriorJob
from lgd_ray.seeding import derive_seed
from lgd_ray.storage import Location, as_location, local_copy
from lgd_ray.train import Fitter, in_process_fitter, pick_device

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
PIPELINE_MARKER = "model_index.json"  # save_pretrained writes it; a pipeline folder is complete when it is there
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Prior:
    """A class-conditional DiT with its scheduler and (for latent DiTs) its VAE.

    The models may hold bfloat16 or float16 weights: their inputs are cast to that dtype and their outputs back to the
    caller's (float32), so the sampler's state and the guidance arithmetic stay in float32.
    """

    transformer: DiTTransformer2DModel
    scheduler: DDIMScheduler | DDPMScheduler
    vae: AutoencoderKL | None
    class_map: torch.Tensor | None = None  # data-set label -> DiT label (a subset of ImageNet on a 1000-class DiT)

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    @property
    def null_class(self) -> int:
        """The label-dropout class used for the unconditional half of classifier-free guidance."""
        return self.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, s = self.transformer.config.in_channels, self.transformer.config.sample_size
        return c, s, s

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device) -> "Prior":
        self.transformer.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Noise prediction, classifier-free guided when cfg_scale > 1; learned-sigma channels dropped."""
        if self.class_map is not None:
            labels = self.class_map.to(labels.device)[labels]
        if cfg_scale <= 1:
            return self._predict(x_t, t, labels)
        null = torch.full_like(labels, self.null_class)
        cond, uncond = self._predict(torch.cat([x_t, x_t]), t, torch.cat([labels, null])).chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    def eps_null(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The unconditional noise prediction (the null class)."""
        return self._predict(x_t, t, torch.full((len(x_t),), self.null_class, device=x_t.device))

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_in = self.scheduler.scale_model_input(x_t, t).to(self.transformer.dtype)
        timesteps = t.reshape(1).to(x_in.device).expand(x_in.shape[0])
        return self.transformer(x_in, timestep=timesteps, class_labels=labels).sample[:, :x_t.shape[1]].to(x_t.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels) -> images in [-1, 1] (not clamped)."""
        if self.vae is None:
            return z
        return self.vae.decode((z / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.to(z.dtype)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] at the prior's resolution -> latents (the VAE posterior mean), or the images."""
        if self.vae is None:
            return images
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean.to(images.dtype) * self.vae.config.scaling_factor

    @property
    def image_size(self) -> int:
        return image_size_of(self.transformer.config, self.vae.config if self.vae is not None else None)

    def checkpoint_blocks(self):
        """Gradient checkpointing of the DiT's blocks and the VAE's decoder blocks (guidance.checkpointing): under
        grad, a block keeps only its input and is run again in the backward. Forwards without grad are unchanged."""
        self.transformer.enable_gradient_checkpointing(checkpointed)
        if self.vae is not None:
            self.vae.enable_gradient_checkpointing(checkpointed)


CHECKPOINT_COUNTS: list = []  # while a memory count runs (lgd_ray.memory.saved_bytes): its counter


def checkpointed(block, *args):
    """Run `block` under non-reentrant activation checkpointing (the models are in eval mode: nothing random to
    replay). Its inputs stay alive until the backward, which runs the block again and holds its activations then."""
    if CHECKPOINT_COUNTS:
        CHECKPOINT_COUNTS[-1].block(block, args)
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)


def image_size_of(transformer_config, vae_config=None) -> int:
    """A DiT pipeline's image resolution: the transformer's sample size, times the VAE's downsampling if it has one."""
    s = transformer_config["sample_size"]
    return s if vae_config is None else s * 2 ** (len(vae_config["block_out_channels"]) - 1)


def pipeline_image_size(model_id: str) -> int | None:
    """The image resolution of a pipeline folder or store URI, from its config files; None for a hub id."""
    root = Location(model_id)
    if not (root / "transformer" / "config.json").exists():
        return None
    vae = root / "vae" / "config.json"
    return image_size_of(json.loads((root / "transformer" / "config.json").read_text()),
                         json.loads(vae.read_text()) if vae.exists() else None)


def local_model(model_id: str, local_cache: str = "~/.cache/lgd_ray") -> str:
    """A hub id or local folder as it is; a store URI copied once per node into `local_cache` (its local folder)."""
    return str(local_copy(Location(model_id), local_cache, PIPELINE_MARKER)) if "://" in model_id else model_id


def load_prior(model_id: str, scheduler: str = "ddim", device="cpu", dtype: str = "float32",
               local_cache: str = "~/.cache/lgd_ray") -> Prior:
    """Load a DiT pipeline's parts from a hub id (`facebook/DiT-XL-2-256`), a local folder saved by save_pretrained, or
    a store URI (copied once per node into `local_cache`; the hub is not contacted).

    The VAE is loaded when model_index.json lists one; the scheduler's config is reused with the class named by
    `scheduler` (ddim | ddpm); the weights are cast to `dtype` (float32 | bfloat16 | float16).
    """
    dtype = DTYPES[dtype]
    model_id = local_model(model_id, local_cache)
    try:
        index = DiffusionPipeline.load_config(model_id)
    except (OSError, EnvironmentError) as e:
        raise ConfigError(f"prior: cannot load a diffusers pipeline from {model_id!r}: {str(e).splitlines()[0]}") from e
    transformer = DiTTransformer2DModel.from_pretrained(model_id, subfolder="transformer", torch_dtype=dtype)
    sched_config = SCHEDULERS[scheduler].load_config(model_id, subfolder="scheduler")
    if scheduler == "ddpm" and sched_config.get("variance_type", "").startswith("learned"):
        sched_config["variance_type"] = "fixed_small"  # learned-sigma channels are dropped, as DiTPipeline does
    sched = SCHEDULERS[scheduler].from_config(sched_config)
    vae = None
    if (index.get("vae") or [None])[0] is not None:
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dtype)
        vae.eval().requires_grad_(False)
    transformer.eval().requires_grad_(False)  # eval: in train mode the label embedding drops labels at random
    return Prior(transformer, sched, vae).to(device)


def random_pipeline(transformer: dict, vae: dict | None = None, seed: int = 0) -> DiTPipeline:
    """A DiTPipeline with random weights of the given shapes (kwargs of DiTTransformer2DModel and AutoencoderKL) and a
    DDIM scheduler with linear betas: a stand-in of a real checkpoint's shapes for tests and benchmarks."""
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(**transformer).eval()
    vae_model = AutoencoderKL(**vae).eval() if vae else None
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=dit, vae=vae_model, scheduler=scheduler)


PRIOR_TRAIN_KEYS = ("patch_size", "num_heads", "head_dim", "depth", "train_timesteps", "train_steps", "batch_size",
                    "lr", "label_dropout", "ema_decay")
LATER_TRAIN_KEYS = ("base", "min_snr_gamma")  # in the key only when set: priors cached before these keys stay valid


def prior_seed(cfg: Config) -> int:
    """The seed the prior is trained with: prior.seed, or the run seed when that is -1."""
    return cfg.seed if cfg.prior.seed < 0 else cfg.prior.seed


def prior_dir(cfg: Config) -> Location:
    """Where the project's prior for this config lives: keyed by the data set and the training keys."""
    p = cfg.prior
    later = {k: getattr(p, k) for k in LATER_TRAIN_KEYS if getattr(p, k) != getattr(PriorConfig(), k)}
    key = {"data": dataclasses.asdict(cfg.data), "seed": prior_seed(cfg),
           "prior": {**{k: getattr(p, k) for k in PRIOR_TRAIN_KEYS}, **later}}
    return Location(cfg.cache).resolve() / f"prior-{cfg.data.name}-{config_hash(key)}"


def prior_checkpoints(cfg: Config) -> Location:
    """The prior fit's checkpoints (deleted once the prior is saved)."""
    return Location(cfg.cache).resolve() / f"{prior_dir(cfg).name}-checkpoints"


def prior_id(cfg: Config) -> str:
    """The model id the sampler loads: prior.model_id, or the folder of the project's own prior."""
    return cfg.prior.model_id or str(prior_dir(cfg))


def require_prior(cfg: Config) -> str:
    """The prior's model id for a process that only loads it (a sampler actor): a project prior or a store copy that
    is not there is one line naming it and the command that makes it (hub ids and local folders go to diffusers)."""
    model_id = prior_id(cfg)
    if (not cfg.prior.model_id or "://" in model_id) and not (Location(model_id) / PIPELINE_MARKER).exists():
        make = (f"python -m lgd_ray.prior {cfg.name or 'CONFIG'}" if not cfg.prior.model_id
                else f"python -m lgd_ray.prior stage HUB_ID {model_id}")
        raise ConfigError(f"prior: no DiT pipeline at {model_id} (no {PIPELINE_MARKER}); make it first: `{make}` "
                          "(`distill` does it in the driver)")
    return model_id


def build_pixel_dit(cfg: Config, n_classes: int) -> DiTTransformer2DModel:
    p = cfg.prior
    if cfg.data.image_size % p.patch_size:
        raise ConfigError(f"config: 'prior.patch_size' {p.patch_size} must divide data.image_size {cfg.data.image_size}")
    return DiTTransformer2DModel(
        num_attention_heads=p.num_heads, attention_head_dim=p.head_dim, in_channels=cfg.data.channels,
        out_channels=cfg.data.channels, num_layers=p.depth, sample_size=cfg.data.image_size,
        patch_size=p.patch_size, num_embeds_ada_norm=n_classes, norm_num_groups=1)


def pixel_job(cfg: Config, load_data: Callable[[], TensorSet], n_classes: int) -> PriorJob:
    """The fit of the project's pixel DiT on `load_data()` (uint8 images), linear-beta DDPM noise."""
    noise = DDPMScheduler(num_train_timesteps=cfg.prior.train_timesteps, beta_schedule="linear", clip_sample=True)
    return PriorJob(cfg.prior, partial(build_pixel_dit, cfg, n_classes), load_data, dict(noise.config),
                    derive_seed(prior_seed(cfg), "prior"), checkpoints=str(prior_checkpoints(cfg)))


def train_prior(job: PriorJob, out: Location, fitter: Fitter, vae: AutoencoderKL | None = None) -> dict:
    """Fit the job's DiT (with `fitter`: in this process or on Ray Train) and save its EMA weights as a DiTPipeline
    with `vae` and the training noise schedule to `out` (model_index.json last); returns the fit's info."""
    weights, metrics = fitter(job)
    torch.manual_seed(job.seed)
    transformer = job.build()
    transformer.load_state_dict(weights)
    info = {"steps": metrics["step"], **{k: metrics[k] for k in ("workers", "seconds", "params", "final_loss",
                                                                  "eval_loss")}}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=DDPMScheduler.from_config(job.noise))
        pipe.save_pretrained(tmp)
        (Path(tmp) / "train_info.json").write_text(json.dumps(info, indent=1))
        as_location(out).upload_dir(Path(tmp), last=PIPELINE_MARKER)
    if job.checkpoints:
        Location(job.checkpoints).delete()
    return info


def ensure_prior(cfg: Config, device="cpu", fitter: Fitter | None = None) -> str:
    """The prior's model id; makes and saves the project's prior first if the config needs one and it is absent:
    the pixel DiT trained, or prior.base fine-tuned on the data set's classes (with `fitter`, default in this process).

    Called by the driver only, before any actor starts (actors call `require_prior`).
    """
    if cfg.prior.model_id:
        return require_prior(cfg)
    out = prior_dir(cfg)
    if not (out / PIPELINE_MARKER).exists():
        fitter = fitter or in_process_fitter(device)
        if cfg.prior.base:
            from lgd_ray.finetune import finetune_prior

            info = finetune_prior(cfg, out, fitter)
        elif cfg.data.name == "folder":
            raise ConfigError("config: a folder data set needs 'prior.model_id' (a DiT pipeline, e.g. "
                              "facebook/DiT-XL-2-256 for ImageNet classes) or 'prior.base' (one to fine-tune on its classes)")
        else:
            print(f"prior: training a pixel DiT on {cfg.data.name} ({cfg.prior.train_steps} steps) -> {out}", flush=True)
            info = train_prior(pixel_job(cfg, partial(load_split, cfg.data, "train"), num_classes(cfg.data)), out,
                               fitter)
        print(f"prior: {info['params'] / 1e6:.2f} M params, loss {info['final_loss']:.4f} (unweighted, fixed draws "
              f"{info['eval_loss']:.4f}), {info['seconds']} s", flush=True)
    return str(out)


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
        parser = argparse.ArgumentParser(prog="python -m lgd_ray.prior stage",
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
            import ray

            from lgd_ray.ray_train import ray_fitter

            if not ray.is_initialized():
                ray.init(address=cfg.ray.address or None)
            fitter = ray_fitter(cfg, Location(cfg.cache))
        print(ensure_prior(cfg, pick_device(cfg.device), fitter))

    run_cli("lgd_ray.prior", "Train the config's prior, or fine-tune prior.base on its classes (skipped if made).",
            argv, work)


if __name__ == "__main__":
    main(sys.argv[1:])
