"""Typed run configuration: YAML in configs/ + dotted `key=value` overrides, validated before any work.

A field named `lambda_` is spelled `lambda` in YAML and on the command line (a Python keyword).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lgd_ray.errors import ConfigError
from lgd_ray.models import check_model_input, check_model_name
from lgd_ray.storage import Location

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


AUTO = None  # an `auto` key's value ("auto" in YAML) until the Ray layer sizes it (lgd_ray.resources.resolve_auto)


def _f(default, **meta):
    """A dataclass field with validation metadata: choices=, min=, max=, min_excl=, length=; lists: item_min=,
    nonempty=; auto=True: the value may be "auto" (the field's type is then `X | None`: None until sized)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    # folder: an image-folder data set (root/<split>/<class>/*.jpg|png), ImageNet and its subsets or a user's own
    name: str = _f("digits", choices=["digits", "fashion-mnist", "folder"])
    root: str = ""  # fashion-mnist: folder of idx(.gz) files; folder: the tree with train/ and val/ (path or URI)
    prepared: str = ""  # folder: folder (path or URI) of uint8 shards made by `python -m lgd_ray.prepare`; "" = files
    # folder only: imagenette | imagewoof | imagenet1k | a text file of class folder names, one a line (label = line)
    classes: str = ""
    image_size: int = _f(8, min=4)  # the classifiers' input size; generated images are resized to it
    train_split: str = "train"  # folder: sub-folder of root
    test_split: str = "val"

    @property
    def channels(self) -> int:
        return 3 if self.name == "folder" else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image the classifiers see, real or distilled."""
        return self.channels, self.image_size, self.image_size


@dataclass
class PriorConfig:
    model_id: str = ""  # hub id, local folder or store URI of a diffusers DiT pipeline; "" = the project's pixel DiT
    scheduler: str = _f("ddim", choices=["ddim", "ddpm"])
    variance: str = _f("fixed_small", choices=["fixed_small", "fixed_large"])  # DDPM's step noise: beta-tilde (DiTPipeline's) | beta
    num_steps: int = _f(50, min=1)
    cfg_scale: float = _f(4.0, min=1.0)  # classifier-free guidance; 1 = off
    dtype: str = _f("float32", choices=["float32", "bfloat16", "float16"])  # DiT and VAE weights; sampler state is fp32
    # Made by `python -m lgd_ray.prior` when model_id is "": the project's pixel DiT trained from scratch, or (base set)
    # a pretrained latent DiT pipeline fine-tuned on the data set's own classes:
    base: str = ""  # hub id, folder or store URI of the DiT pipeline to fine-tune; "" = train the pixel DiT
    patch_size: int = _f(2, min=1)
    num_heads: int = _f(4, min=1)
    head_dim: int = _f(32, min=8)
    depth: int = _f(4, min=1)
    train_timesteps: int = _f(1000, min=10)
    train_steps: int = _f(2000, min=1)
    batch_size: int = _f(128, min=1)
    lr: float = _f(1e-3, min_excl=0.0)
    label_dropout: float = _f(0.1, min_excl=0.0, max=1.0)  # > 0 so the null class exists for CFG
    ema_decay: float = _f(0.999, min=0.0, max=1.0)  # the saved prior is the EMA of the weights (with warm-up)
    min_snr_gamma: float = _f(0.0, min=0.0)  # min-SNR-gamma loss weights (Hang et al. 2023; 5 there); 0 = plain MSE
    autocast: str = _f("", choices=["", "bfloat16"])  # the fit's forward under torch.autocast in this dtype (weights,
    #                                                   optimizer and EMA stay float32): about half the activations
    checkpointing: bool = False  # the fit recomputes the DiT's blocks in its backward (the same weights, less memory)
    compile: bool = False  # the fit's DiT under torch.compile (inductor; needs a C++ compiler on CPU): faster steps
    #                        after a one-off compilation, float sums in another order (part of the prior's identity)
    seed: int = _f(-1, min=-1)  # the prior's own seed (its init, batches and noise); -1 = the run seed. Fixed, it
                                # shares one prior between runs of different seeds
    checkpoint_steps: int = _f(500, min=1)  # steps between checkpoints (weights, EMA, optimizer, step): a crashed fit
                                            # run again continues from the newest
    # A latent prior made by the project (latent_channels > 0): an AutoencoderKL trained on the train split, then a
    # latent DiT on its latents, saved as a DiTPipeline folder like facebook/DiT-XL-2-256 (lgd_ray/latent_prior.py)
    latent_channels: int = _f(0, min=0)  # the VAE's latent channels; 0 = the pixel DiT
    vae_channels: list = _f([32, 64, 64], item_min=1, nonempty=True)  # the VAE's block widths: len - 1 halvings
    vae_steps: int = _f(3000, min=1)  # the VAE's fit (batch prior.batch_size, checkpointed every checkpoint_steps)
    vae_lr: float = _f(1e-3, min_excl=0.0)
    vae_kl: float = _f(1e-6, min=0.0)  # weight of the KL term against the per-pixel squared error
    learned_sigma: bool = False  # the DiT also predicts its variance (2x out channels), trained by the VLB as in DiT


@dataclass
class TrainConfig:
    epochs: int = _f(100, min=1)
    batch_size: int = _f(64, min=1)
    lr: float = _f(0.01, min_excl=0.0)
    momentum: float = _f(0.9, min=0.0, max=1.0)
    weight_decay: float = _f(5e-4, min=0.0)
    milestones: list = _f([0.6667, 0.8333])  # fractions of the epochs where the lr is multiplied by lr_decay
    lr_decay: float = _f(0.2, min_excl=0.0, max=1.0)
    crop_scale: float = _f(0.5, min_excl=0.0, max=1.0)  # RandomResizedCrop scale lower bound; 1 = no crop
    flip: bool = True
    cutmix: float = _f(0.0, min=0.0)  # CutMix Beta(cutmix, cutmix) parameter; 0 = off
    cutmix_prob: float = _f(0.5, min=0.0, max=1.0)  # share of batches mixed when cutmix > 0


@dataclass
class ClassifierConfig:
    model: str = "convnet3"  # convnet<D> | resnetap10 | resnet18
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DistillConfig:
    method: str = _f("lgd", choices=["random", "dit", "mgd3", "dds", "lgd"])  # see docs/DESIGN.md section 2
    seed_ipc: int = _f(10, min=1)  # images per class of the unguided seed increment I_0
    seed_from: str = _f("generated", choices=["generated", "real"])  # I_0 of dit, mgd3 and lgd: generated without
    #                                  guidance, or real train images (method random's seeded subset, the same bytes)
    ipc_per_stage: int = _f(10, min=1)
    stages: int = _f(4, min=0)  # guided increments I_1..I_K
    sample_batch: int = _f(64, min=1)  # trajectories per sampler batch (candidates included)
    classes_per_chunk: int = _f(5, min=1)  # one shard per chunk; fixed so output does not depend on workers

    @property
    def total_ipc(self) -> int:
        """Images per class of the whole run."""
        return self.seed_ipc + self.stages * self.ipc_per_stage


@dataclass
class GuidanceConfig:
    lambda_: float = _f(0.05, min=0.0)  # learnability guidance weight (see norm_scale)
    omega: float = _f(0.5, min=0.0)  # S = CE(student) - omega * CE(reference)
    kappa: int = _f(3, min=1)  # candidates per slot; the highest S is kept
    gamma: float = _f(0.0, min=0.0)  # deviation guidance weight (away from already chosen images)
    window: list = _f([10, 45], length=2)  # sampling-step indices (counting down from num_steps-1) guided
    through: str = _f("denoiser", choices=["denoiser", "decoder"])  # gradient path of grad_{x_t} S
    norm_scale: float = _f(1.0, min_excl=0.0)  # rho_t multiplier: guidance norm = lambda*norm_scale*sqrt(1-abar)*|eps|
    batch: int | None = _f(0, min=0, auto=True)  # trajectories per guided backward (memory of a guided step); 0 = the
    #                                              sample batch; auto: the most a GPU actor holds (the meta-device
    #                                              count of lgd_ray/gpu_memory.py, at most the sample batch), CPU 0
    checkpointing: bool = False  # recompute the DiT's and the VAE decoder's blocks in the guided backward: less
    #                               memory per trajectory, about one more forward of compute
    every: int = _f(1, min=1)  # follow the gradient at every this-many-th step of the window (1 = all: the paper's)
    augment: int = _f(0, min=0)  # g_S: S averaged over this many random views of the image (the student's training
    #                               crops and flips: robust guidance); 0 = the image itself (the paper's)
    select_after: int = _f(0, min=0)  # early rejection: the kappa candidates run this many steps, only the best by S
    #                                   of x0^ runs on; 0 = all candidates run to the end (the paper's)
    # the decoder of x0^ in the guided step of a latent prior (selection and the written images keep the full one):
    decoder: str = _f("full", choices=["full", "tiny"])  # tiny: a small CNN fitted to the VAE decoder (lgd_ray/tiny_decoder.py)
    tiny_width: int = _f(64, min=1)  # its channels
    tiny_steps: int = _f(2000, min=1)  # its fit (batch prior.batch_size, checkpointed every prior.checkpoint_steps)
    tiny_lr: float = _f(1e-3, min_excl=0.0)
    tiny_trajectories: int = _f(32, min=0)  # unguided trajectories per class whose x0^ at the guided steps it is fitted
    #                                         on, beside the train split's latents
    # method mgd3: x0^ <- x0^ + mode_lambda * sigma_t * (mode - x0^) at step indices >= mode_stop
    mode_lambda: float = _f(0.1, min=0.0)
    mode_stop: int = _f(25, min=0)
    mode_max_images: int = _f(0, min=0)  # real images per class given to k-means (seeded subset); 0 = all

    @property
    def active(self) -> bool:
        """Whether lgd's guided stages follow a gradient (of S, or the deviation gradient) inside the window."""
        return self.lambda_ > 0 or self.gamma > 0


@dataclass
class DDSConfig:
    """Method dds: real patches chosen with the prior (lgd_ray/dds.py), one increment of all IPC."""

    timesteps: list = _f([100, 300, 500], nonempty=True, item_min=0)  # noise levels (training-timestep scale) whose errors are averaged
    crop: float = _f(0.5, min_excl=0.0, max=1.0)  # crop side as a share of the prior's image size
    candidates: int = _f(4, min=1)  # candidate crops per real image
    max_images: int = _f(500, min=0)  # real images per class examined (seeded subset); 0 = all
    features: str = _f("reference", choices=["reference", "pixels"])  # what k-means clusters
    batch_size: int = _f(128, min=1)


@dataclass
class RdedConfig:
    """evaluate.labels rded: the RDED protocol, as its validation code runs it (Sun et al., CVPR 2024): each image's
    strips shuffled (factor across, then factor down), RandomResizedCrop(scale=(1/factor, 1)) and flips; CutMix on every
    batch; the teacher's soft labels at `temperature` on the mixed batch (KL, no T^2 factor); AdamW with weight decay
    on weights of 2+ dimensions only; the lr times 0.5 (1 + cos(pi e / 2E)) at epoch e of E."""

    epochs: int = _f(300, min=1)
    lr: float = _f(0.001, min_excl=0.0)  # RDED's for ConvNets and ResNet-18
    weight_decay: float = _f(0.01, min=0.0)
    temperature: float = _f(20.0, min_excl=0.0)  # RDED's with CutMix
    cutmix: float = _f(1.0, min_excl=0.0)  # Beta(cutmix, cutmix)
    factor: int = _f(1, min=1)  # patches per side: RDED's own sets are 2 x 2 composites (2); 1 = no shuffle, no crop
    batch_size: int = _f(0, min=0)  # 0 = RDED's rule: 50 at IPC <= 10, else 100; twice that with 100+ classes


@dataclass
class EvalConfig:
    """The evaluation protocol: a fresh classifier trained on the distilled set, tested on the real test split."""

    model: str = ""  # "" = the student's model; any name of the registry (convnet3, resnetap10, resnet18 ...)
    train: TrainConfig = field(default_factory=TrainConfig)  # train.epochs is used when epochs_by_ipc is empty
    ipc_breaks: list = _f([10, 50], item_min=1)  # epochs_by_ipc[i] applies to IPC <= ipc_breaks[i]; the last entry above all
    epochs_by_ipc: list = _f([1000, 500, 300], item_min=1)
    eval_every: int = _f(10, min=1)  # test every this many epochs (and after the last): "best" is over these
    repeats: int = _f(3, min=1)  # fresh models (seeds) per evaluation, run in parallel as Ray tasks
    ipc: int = _f(0, min=0)  # evaluate the run's first stages up to this IPC; 0 = the whole run
    # soft: KD from the run's reference model (theta*) in this recipe; rded: the RDED protocol (evaluate.rded), the
    # reference as its teacher
    labels: str = _f("hard", choices=["hard", "soft", "rded"])
    temperature: float = _f(4.0, min_excl=0.0)  # soft labels: softmax temperature of teacher and student
    # soft / rded labels' teacher: reference (the run's theta*) | a timm ImageNet model (resnet18.tv_in1k: the papers'
    # torchvision ResNet-18), its weights from the hub or NAME@WEIGHTS.safetensors (lgd_ray/teachers.py)
    teacher: str = _f("reference", nonempty=True)
    rded: RdedConfig = field(default_factory=RdedConfig)


@dataclass
class SweepConfig:
    """`python -m lgd_ray.sweep`: Ray Tune over omega and lambda, each trial a small distillation (in-process)."""

    omega: list = _f([0.5, 1.0], nonempty=True, item_min=0)  # grid values; search=random samples uniformly between min and max
    lambda_: list = _f([0.02, 0.05], nonempty=True, item_min=0)
    search: str = _f("grid", choices=["grid", "random"])
    num_samples: int = _f(1, min=1)  # grid: repeats of the whole grid; random: trials
    stages: int = _f(2, min=1)  # guided stages per trial (the student's test accuracy is reported after each)
    grace_period: int = _f(1, min=1)  # ASHA: stages every trial runs before it may be stopped
    reduction_factor: int = _f(2, min=2)
    max_concurrent: int = _f(2, min=1)
    cpus_per_trial: float = _f(1.0, min=0.0)
    gpus_per_trial: float = _f(0.0, min=0.0)


@dataclass
class StorageConfig:
    """Run folders, caches and data on a store."""

    retry_s: float = _f(120.0, min=0.0)  # transient store errors (5xx, throttling, time-outs, resets) retried this long
    lease_s: float = _f(60.0, min=1.0)  # a run folder's driver lease: renewed every third of it, lapses this long after
    #                                     its driver died (then another driver may take the folder over)


@dataclass
class PrepareConfig:
    """`python -m lgd_ray.prepare`: decoding an ImageFolder tree into shards."""

    bad_images: str = _f("fail", choices=["fail", "skip"])  # a file that does not decode: stop, naming it, or skip it
    #                                                        (listed in bad_images.txt beside the index)


@dataclass
class RayConfig:
    """Resources. A run's sampler actors live from stage to stage and fit the one-worker students; a fit of several
    DDP workers releases them first, so that sampling and training never wait on each other. The number of actors
    never changes the output;
    the number of DDP workers does (float arithmetic), though the recipe (global batch, learning rate) stays the same."""

    enabled: bool = True  # false: chunks run one after another in this process, without Ray
    address: str = ""  # "" = RAY_ADDRESS (set under `ray job submit`), else a local Ray
    actors: int | None = _f(2, min=1, auto=True)  # sampler actors, each holding the prior and the reference model; auto: one
    #                                        per num_gpus_per_actor of the GPUs the cluster has or can scale to
    num_cpus_per_actor: float = _f(1.0, min=0.0)  # logical CPUs; the actor uses max(1, round(n)) torch threads
    num_gpus_per_actor: float | None = _f(0.0, min=0.0, auto=True)  # > 0: the actor runs on CUDA (and fails fast if
    #                                  torch sees none); auto: an equal share of a GPU if the cluster has any, else 0
    max_restarts: int = _f(2, min=0)  # per actor, and the failures a Ray Train fit recovers from (from its checkpoint)
    chunk_retries: int = _f(2, min=0)  # a chunk whose I/O failed is retried this often, with back-off, then fails
    chunk_timeout_s: float = _f(0.0, min=0.0)  # a chunk running longer (a hung kernel) is given up: its actor restarts
    #                                            and the chunk goes elsewhere; 0 = 10x the stage's slowest chunk yet
    #                                            (before one: the dry-run's count at a slow rate), at least
    #                                            chunk_timeout_floor_s, plus storage.retry_s (a store outage)
    chunk_timeout_floor_s: float = _f(300.0, min=0.0)  # the least time a chunk or evaluation task gets with 0 above
    schedule_timeout_s: float = _f(600.0, min_excl=0.0)  # longest wait for resources (e.g. autoscaling), then one line
    accelerator_type: str = ""  # e.g. H100: actors and train workers only on nodes of that type ("" = any)
    gpu_memory_gb: float = _f(0.0, min=0.0)  # memory of one GPU; 0 = by accelerator_type (H100 if unset)
    train_workers: int | None = _f(1, min=1, auto=True)  # Ray Train workers (DDP) per fit; each takes batch_size /
    #                                               train_workers a step; auto: one per train_gpus_per_worker GPUs
    min_worker_batch: int = _f(32, min=1)  # a student fit takes at most one DDP worker per this many images of its
    #                                        per-step batch and of its data (fewer workers for a small increment)
    train_use_gpu: bool | None = _f(False, auto=True)  # auto: if the cluster has GPUs
    train_cpus_per_worker: float = _f(1.0, min=0.0)
    train_gpus_per_worker: float = _f(1.0, min=0.0)  # used with train_use_gpu; NCCL needs one whole GPU per worker
    checkpoint_every: int = _f(10, min=1)  # epochs between a Ray Train fit's checkpoints (resumed after a failure)


@dataclass
class Config:
    seed: int = _f(0, min=0)
    out: str = ""  # run folder, a path or a URI (s3://, gs://, ...); "" = runs/<config name>-<config hash>
    cache: str = "runs/cache"  # trained priors and reference models, keyed by their config (a path or a URI)
    local_cache: str = "~/.cache/lgd_ray"  # node-local folder: each node's copy of a prior that lives in a store
    device: str = _f("auto", choices=["auto", "cpu", "cuda"])
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    reference: ClassifierConfig = field(default_factory=ClassifierConfig)
    student: ClassifierConfig = field(default_factory=ClassifierConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    dds: DDSConfig = field(default_factory=DDSConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    name: str = ""  # filled from the config file name


def _key(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")


def _check_value(path: str, value, tp, meta):
    if meta.get("auto"):
        if value is None or value == "auto":
            return AUTO
        tp = next(a for a in typing.get_args(tp) if a is not type(None))  # X of `X | None`
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config: '{path}' must be a mapping of keys, got {value!r}")
        return _build(tp, value, path + ".")
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    else:
        raise TypeError(tp)
    if not ok:
        raise ConfigError(f"config: '{path}' must be {getattr(tp, '__name__', tp)}, got {value!r}")
    numbers = value if origin is list else [value] if tp is float else []
    if not all(math.isfinite(v) for v in numbers):  # NaN passes every comparison below, inf most of them
        raise ConfigError(f"config: '{path}' must be a finite number, got {value!r}")
    if meta.get("nonempty") and not value:
        raise ConfigError(f"config: '{path}' must not be empty")
    if "item_min" in meta and any(v < meta["item_min"] for v in value):
        raise ConfigError(f"config: every entry of '{path}' must be >= {meta['item_min']}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"config: '{path}' must be one of {meta['choices']}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"config: '{path}' must be >= {meta['min']}, got {value!r}")
    if "min_excl" in meta and value <= meta["min_excl"]:
        raise ConfigError(f"config: '{path}' must be > {meta['min_excl']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"config: '{path}' must be <= {meta['max']}, got {value!r}")
    if "length" in meta and len(value) != meta["length"]:
        raise ConfigError(f"config: '{path}' must be a list of {meta['length']} numbers, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (allowed: {', '.join(fields)})"
            raise ConfigError(f"config: unknown key '{prefix}{key}'{hint}")
        f = fields[key]
        kwargs[f.name] = _check_value(prefix + key, value, hints[f.name], f.metadata)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config: '{dotted}': '{p}' is not a section")
    node[leaf] = value


def resolve_path(name_or_path: str) -> Path:
    """A name in configs/ (`digits`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(names)}"
    raise ConfigError(f"config: no config '{name_or_path}' (a name in configs/ or a .yaml path; {hint})")


def apply_overrides(tree: dict, overrides: list[str], section: str = "") -> dict:
    """Apply `a.b=value` overrides (values parsed as YAML) to a config tree; with `section`, a key whose first part
    is not a top-level key means `section.key` (`repeats=5`, `train.epochs=10` -> evaluate.*)."""
    top = {_key(f) for f in dataclasses.fields(Config)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override '{item}' must look like key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        if section and key.split(".")[0] not in top:
            key = f"{section}.{key}"
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"config: override '{item}': the value is not YAML ({_yaml_problem(e)})") from None
        _set_dotted(tree, key, value)
    return tree


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What the YAML parser found, and where, in one line."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def build_config(tree: dict) -> Config:
    """A validated Config from a tree (every key checked, then the checks across keys)."""
    cfg = _build(Config, tree)
    _check_cross(cfg)
    return cfg


def load_config(name_or_path: str, overrides: list[str] = (), section: str = "") -> Config:
    """Load a YAML config, apply overrides (see apply_overrides), validate everything."""
    path = resolve_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config: {path} must hold a mapping")
    apply_overrides(tree, overrides, section)
    tree.setdefault("name", path.stem)
    return build_config(tree)


def _check_cross(cfg: Config):
    lo, hi = cfg.guidance.window
    if not 0 <= lo <= hi:
        raise ConfigError(f"config: 'guidance.window' must be [lo, hi] with 0 <= lo <= hi, got {cfg.guidance.window}")
    if cfg.data.name == "folder" and not ((cfg.data.root or cfg.data.prepared) and cfg.data.classes):
        raise ConfigError("config: 'data.classes' and 'data.root' (or 'data.prepared') must be set for data.name=folder")
    if cfg.prior.latent_channels and (cfg.prior.base or cfg.data.name == "folder"):
        raise ConfigError("config: 'prior.latent_channels' (a VAE and a latent DiT made by the project) is for the "
                          "packaged data sets; a folder data set fine-tunes a latent DiT instead: 'prior.base'")
    if cfg.prior.base and (cfg.prior.model_id or cfg.data.name != "folder"):
        raise ConfigError("config: 'prior.base' (a DiT pipeline to fine-tune) needs data.name=folder (RGB images) and "
                          "no 'prior.model_id' (that prior is loaded as it is)")
    for key, name in (("reference.model", cfg.reference.model), ("student.model", cfg.student.model),
                      ("evaluate.model", cfg.evaluate.model or cfg.student.model)):
        problem = check_model_name(name) or check_model_input(name, cfg.data.image_size)
        if problem:
            raise ConfigError(f"config: '{key}' {problem}")
    r = cfg.ray
    if (r.train_use_gpu is True and r.train_workers is not AUTO and r.train_workers > 1
            and r.train_gpus_per_worker != int(r.train_gpus_per_worker)):
        raise ConfigError(f"config: 'ray.train_gpus_per_worker' is {r.train_gpus_per_worker} with {r.train_workers} "
                          "NCCL workers: NCCL refuses two ranks on one GPU; use whole GPUs (1)")
    if r.enabled and r.train_workers is not AUTO:  # auto: checked once sized (lgd_ray.resources.resolve_auto)
        for key in ("reference", "student"):
            batch = getattr(cfg, key).train.batch_size
            if batch % r.train_workers:
                raise ConfigError(f"config: '{key}.train.batch_size' {batch} is not a multiple of ray.train_workers "
                                  f"{r.train_workers}: each DDP worker takes an equal part of the global batch")
    e = cfg.evaluate
    if e.epochs_by_ipc and len(e.epochs_by_ipc) != len(e.ipc_breaks) + 1:
        raise ConfigError(f"config: 'evaluate.epochs_by_ipc' needs len(ipc_breaks) + 1 = {len(e.ipc_breaks) + 1} "
                          f"entries, got {e.epochs_by_ipc}")


def auto_keys(cfg: Config) -> list[str]:
    """The `ray` keys left at `auto` (sized by resolve_auto once Ray is connected; guidance.batch after them)."""
    r = cfg.ray
    return [f"ray.{key}" for key, value in (("actors", r.actors), ("train_workers", r.train_workers),
                                            ("num_gpus_per_actor", r.num_gpus_per_actor),
                                            ("train_use_gpu", r.train_use_gpu)) if value is AUTO] + (
        ["guidance.batch"] if cfg.guidance.batch is AUTO else [])


def to_dict(cfg) -> dict:
    """The config as a plain dict with YAML spelling of keys (an unsized `auto` key as "auto")."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("auto") and value is AUTO:
            value = "auto"
        out[_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def from_dict(tree: dict) -> Config:
    return _build(Config, tree)


def config_hash(tree) -> str:
    """Short sha256 of a config (or any JSON-able part of one)."""
    if dataclasses.is_dataclass(tree):
        tree = to_dict(tree)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def run_identity(cfg: Config) -> dict:
    """What decides a run's output: the config less its resources (the `ray` keys but train_workers and, with several,
    min_worker_batch; local_cache; guidance.batch, sized by the GPU and halved on out-of-memory: it splits a guided
    backward, every term per image), evaluation, sweep, storage retries and prepare (the prepared set's own index says
    what it holds)."""
    tree = to_dict(cfg)
    del tree["evaluate"], tree["sweep"], tree["local_cache"], tree["storage"], tree["prepare"]
    del tree["guidance"]["batch"]
    tree["ray"] = {"train_workers": cfg.ray.train_workers}
    if cfg.ray.train_workers != 1:  # it sizes the student fits only where there may be several workers
        tree["ray"]["min_worker_batch"] = cfg.ray.min_worker_batch
    return tree


def run_dir(cfg: Config) -> Location:
    """The run folder as a storage Location: `out`, or runs/<config name>-<config hash> under the working folder."""
    return Location(cfg.out or f"runs/{cfg.name}-{config_hash(run_identity(cfg))}").resolve()
