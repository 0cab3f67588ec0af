"""The diffusion prior in use: a diffusers DiT pipeline (transformer, optional VAE, scheduler) loaded from a hub id,
a folder or a store URI, and where the project's own prior of a config lives (`prior_dir`).

Making a prior (training the pixel DiT, fine-tuning `prior.base`, staging a hub pipeline to a store) is
lgd_ray/prior_make.py; `python -m lgd_ray.prior ...` runs its command line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel

from lgd_ray.config import Config, ConfigError, PriorConfig, config_hash
from lgd_ray.data import imagenet_indices, num_classes
from lgd_ray.storage import Location, local_copy

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

    def signal_noise(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) of the scheduler at timestep t, as `like`'s dtype and device."""
        abar = self.scheduler.alphas_cumprod[int(t)].to(like)
        return abar.sqrt(), (1 - abar).sqrt()

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The predicted clean sample x0^ = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        alpha, sigma = self.signal_noise(t, x_t)
        return (x_t - sigma * eps) / alpha

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


def checkpointed(block, *args, context_fn=torch.utils.checkpoint.noop_context_fn):
    """Run `block` under non-reentrant activation checkpointing (the models are in eval mode: nothing random to
    replay). Its inputs stay alive until the backward, which runs the block again and holds its activations then.
    context_fn: torch.utils.checkpoint's (the modes the forward and the recompute run under)."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False,
                                             context_fn=context_fn)


def image_size_of(transformer_config, vae_config=None) -> int:
    """A DiT pipeline's image resolution: the transformer's sample size, times the VAE's downsampling if it has one."""
    s = transformer_config["sample_size"]
    return s if vae_config is None else s * 2 ** (len(vae_config["block_out_channels"]) - 1)


def project_configs(cfg: Config, n_classes: int | None = None) -> tuple[dict, dict | None]:
    """The DiTTransformer2DModel and AutoencoderKL kwargs (None: a pixel DiT) of the project's own prior of `cfg` (for
    n_classes classes, default the data set's):
    prior.latent_channels > 0 puts the DiT on the latents of a VAE with prior.vae_channels' blocks (each but the
    first halves the size); prior.learned_sigma doubles its output channels."""
    p, d = cfg.prior, cfg.data
    channels, size, vae = d.channels, d.image_size, None
    if p.latent_channels:
        n, down = len(p.vae_channels), 2 ** (len(p.vae_channels) - 1)
        if d.image_size % down:
            raise ConfigError(f"config: data.image_size {d.image_size} is not a multiple of {down}, the downsampling of "
                              f"prior.vae_channels' {n} blocks")
        vae = {"in_channels": d.channels, "out_channels": d.channels, "down_block_types": ["DownEncoderBlock2D"] * n,
               "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(p.vae_channels),
               "layers_per_block": 1, "latent_channels": p.latent_channels,
               "norm_num_groups": math.gcd(32, *p.vae_channels), "sample_size": d.image_size}
        channels, size = p.latent_channels, d.image_size // down
    if size % p.patch_size:
        raise ConfigError(f"config: 'prior.patch_size' {p.patch_size} must divide the DiT's input size {size}")
    dit = {"num_attention_heads": p.num_heads, "attention_head_dim": p.head_dim, "in_channels": channels,
           "out_channels": channels * (2 if p.learned_sigma else 1), "num_layers": p.depth, "sample_size": size,
           "patch_size": p.patch_size, "num_embeds_ada_norm": n_classes or num_classes(d), "norm_num_groups": 1}
    return dit, vae


def pipeline_image_size(model_id: str) -> int | None:
    """The image resolution of a pipeline folder or store URI, from its config files; None for a hub id."""
    root = Location(model_id)
    if not (root / "transformer" / "config.json").exists():
        return None
    vae = root / "vae" / "config.json"
    return image_size_of(json.loads((root / "transformer" / "config.json").read_text()),
                         json.loads(vae.read_text()) if vae.exists() else None)


def local_model(model_id: str, local_cache: str = "~/.cache/lgd_ray", marker: str = PIPELINE_MARKER) -> str:
    """A hub id or local folder as it is; a store URI copied once per node into `local_cache` (its local folder),
    complete when `marker` is in it."""
    return str(local_copy(Location(model_id), local_cache, marker)) if "://" in model_id else model_id


def load_prior(model_id: str, scheduler: str = "ddim", device="cpu", dtype: str = "float32",
               local_cache: str = "~/.cache/lgd_ray", variance: str = "fixed_small") -> Prior:
    """Load a DiT pipeline's parts from a hub id (`facebook/DiT-XL-2-256`), a local folder saved by save_pretrained, or
    a store URI (copied once per node into `local_cache`; the hub is not contacted).

    The VAE is loaded when model_index.json lists one; the scheduler's config is reused with the class named by
    `scheduler` (ddim | ddpm), DDPM's with the step variance `variance` (fixed_small | fixed_large: a learned-sigma
    DiT's variance channels are dropped, as DiTPipeline does); the weights are cast to `dtype` (float32 | bfloat16 |
    float16).
    """
    dtype = DTYPES[dtype]
    model_id = local_model(model_id, local_cache)
    try:
        index = DiffusionPipeline.load_config(model_id)
    except (OSError, EnvironmentError) as e:
        raise ConfigError(f"prior: cannot load a diffusers pipeline from {model_id!r}: {str(e).splitlines()[0]}") from e
    transformer = DiTTransformer2DModel.from_pretrained(model_id, subfolder="transformer", torch_dtype=dtype)
    sched_config = SCHEDULERS[scheduler].load_config(model_id, subfolder="scheduler")
    if scheduler == "ddpm":
        sched_config["variance_type"] = variance
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


def prior_class_map(cfg: Config, prior: Prior) -> torch.Tensor | None:
    """For a folder data set of ImageNet classes on a 1000-class DiT: each class's ImageNet-1K index; None (identity)
    when the DiT has the data set's own classes (fine-tuned on them, or the project's pixel DiT)."""
    if cfg.data.name != "folder" or prior.num_classes == num_classes(cfg.data):
        return None
    fix = "fine-tune a DiT on them: python -m lgd_ray.prior CONFIG prior.model_id= prior.base=HUB_ID"
    if prior.num_classes != 1000:
        raise ConfigError(f"prior: the DiT has {prior.num_classes} classes, data.classes {num_classes(cfg.data)}; {fix}")
    try:
        return torch.tensor(imagenet_indices(cfg.data))
    except ConfigError as e:
        raise ConfigError(f"prior: the DiT has 1000 ImageNet classes, {str(e).removeprefix('config: ')}; {fix}") from None


def configured_prior(cfg: Config, model_id: str, device="cpu", scheduler: str | None = None,
                     dtype: str | None = None) -> Prior:
    """The prior at `model_id` as cfg.prior samples it (its scheduler, dtype and step variance, unless `scheduler` or
    `dtype` is given), with the data set's class map (prior_class_map)."""
    prior = load_prior(model_id, scheduler or cfg.prior.scheduler, device, dtype or cfg.prior.dtype, cfg.local_cache,
                       cfg.prior.variance)
    prior.class_map = prior_class_map(cfg, prior)
    return prior


PRIOR_TRAIN_KEYS = ("patch_size", "num_heads", "head_dim", "depth", "train_timesteps", "train_steps", "batch_size",
                    "lr", "label_dropout", "ema_decay")
LATER_TRAIN_KEYS = ("base", "min_snr_gamma", "autocast", "compile", "latent_channels", "vae_channels", "vae_steps",
                    "vae_lr", "vae_kl", "learned_sigma")  # in the key only when set: priors cached before these keys stay valid


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


def prior_weights_sha256(model_id: str | None) -> str | None:
    """sha256 of a prior's transformer weights (a folder or store URI; None for a hub id or no prior)."""
    if model_id is None:
        return None
    weights = Location(model_id) / "transformer" / "diffusion_pytorch_model.safetensors"
    return weights.sha256() if weights.exists() else None


if __name__ == "__main__":  # `python -m lgd_ray.prior`: the command lives with the making of priors
    from lgd_ray.prior_make import main

    main(sys.argv[1:])
