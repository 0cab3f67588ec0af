"""GPU memory of a sampler actor, counted on the meta device: what `distill --dry-run` prints and what it refuses.

A guided step holds, from its forward until its backward, every tensor autograd saved on the way from x_t through
the DiT (the CFG pair), the VAE decoder and both classifiers. `saved_bytes` counts them with a saved-tensors hook
(once per storage; weights excluded) while the real guided step (`Guide`) runs on models built on the meta device
(attention as CUDA runs it; a retained backward's working set on top: `_AsOnCuda`); two batch sizes give the bytes
per trajectory and the fixed part. Unguided steps and the final decode save nothing: their peak is a few live
activations, bounded here by 4 x the largest tensor one op makes per image.
The result is an estimate of torch's allocated memory (what torch.cuda.max_memory_allocated reports), plus a fixed
allowance for the CUDA context and cuBLAS workspaces; bench/gpu_check.py measures both on a GPU.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers import DDIMScheduler

from lgd_ray.config import AUTO, Config, ConfigError
from lgd_ray.cost import meta_models
from lgd_ray.data import num_classes
from lgd_ray.guidance import Guide, Scorer
from lgd_ray.methods import method_of, stage_plan
from lgd_ray.prior import Prior, checkpointed
from lgd_ray.tiny_decoder import build_tiny

GIB = 1 << 30
# GPU memory by Ray accelerator type (ray.util.accelerators), GB as sold; ray.gpu_memory_gb overrides
GPU_MEMORY_GB = {"H200": 141, "H100": 80, "A100-80G": 80, "A100-40G": 40, "A100": 40, "L40S": 48, "L4": 24,
                 "A10G": 24, "V100": 16, "T4": 16}
DEFAULT_GPU = "H100"
CONTEXT_BYTES = 1.5 * GIB  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator
USABLE = 0.9  # share of the rest that the estimate may fill (allocator fragmentation, estimate error)


class _Count:
    """The most bytes that storages kept for backward hold at once (parameters and buffers excluded).

    A storage counts from the first time a tensor on it is saved until every such saved tensor is freed (some are
    freed before the backward: saved by ops whose results the forward drops). Counting liveness, not addresses,
    also keeps a freed storage's reused address from hiding a new one."""

    def __init__(self, exclude: list[torch.nn.Module]):
        self.skip = {t.untyped_storage()._cdata for m in exclude for t in (*m.parameters(), *m.buffers())}
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, saved tensors alive on it]
        self.bytes = self.peak = 0
        self.largest_block = 0  # the most bytes one checkpointed block holds while it is run again in the backward

    def pack(self, t):
        """Saved-tensors pack hook. It keeps a detached alias: the tensor itself would tie a saved output to its own
        graph node (a cycle that outlives a dropped graph)."""
        alias = t.detach()
        self.keep(alias)
        return alias

    def keep(self, t: torch.Tensor):
        """Count t's storage while t lives."""
        st = t.untyped_storage()
        key = st._cdata
        if key in self.skip:
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [st.nbytes(), 1]
            self.bytes += st.nbytes()
            self.peak = max(self.peak, self.bytes)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes -= entry[0]
            del self.live[key]

    def checkpointed(self, block, *args):
        """lgd_ray.prior.checkpointed, counted (what saved_bytes puts in place of a checkpointed model's function):
        the block's inputs kept, its activations measured; the recompute in the backward runs under the count's modes
        too."""
        self.block(block, args)
        return checkpointed(block, *args, context_fn=self.contexts)

    def block(self, block: torch.nn.Module, args: tuple):
        """A checkpointed block: its tensor inputs are kept; its own activations only while it is recomputed."""
        for a in args:
            if isinstance(a, torch.Tensor):
                self.keep(a)
        inner = _Count([block])
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
            block(*args)
        self.largest_block = max(self.largest_block, inner.total)

    @staticmethod
    def contexts():
        """torch.utils.checkpoint's context_fn: the forward runs inside saved_bytes' modes already; the recompute in
        the backward (autograd's own thread on the meta device) must enter them again."""
        return contextlib.nullcontext(), _AsOnCuda()

    @property
    def total(self) -> int:
        return self.peak + self.largest_block


class _Live(TorchDispatchMode):
    """The most bytes that storages made by ops while active hold at once (`_Count.keep` on every op's outputs)."""

    def __init__(self):
        super().__init__()
        self.count = _Count([])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.count.keep(t)
        return out


class _AsOnCuda(TorchFunctionMode):
    """What a count must see as CUDA runs it (each measured against an H200, torch 2.11, DiT-XL/2 guided step):

    - scaled_dot_product_attention on the meta device runs the memory-efficient kernel (saves its output and
      log-sum-exp), not the math path meta would take (saves the attention matrix: 0.16 float32 / 0.29 bfloat16 GiB
      more per trajectory than CUDA, whose default kernel saved what the efficient one saves; flash was refused);
    - a backward that retains its graph (deviation guidance's first one on the decoder path) frees no saved tensor
      on its way, so its own working set (gradients in flight) comes on top of them: `retained_backward`, its most
      live bytes."""

    def __init__(self):
        super().__init__()
        self.retained_backward = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.autograd.grad and kwargs.get("retain_graph"):
            with _Live() as live:
                out = func(*args, **kwargs)
            self.retained_backward = max(self.retained_backward, live.count.peak)
            return out
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        a = {**dict(zip(names, args)), **kwargs}
        if a["query"].device.type != "meta" or a.get("enable_gqa"):
            return func(*args, **kwargs)
        grad = torch.is_grad_enabled() and any(a[n].requires_grad for n in ("query", "key", "value"))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            a["query"], a["key"], a["value"], a.get("attn_mask"), grad, a.get("dropout_p", 0.0),
            a.get("is_causal", False), scale=a.get("scale"))[0]


def saved_bytes(fn, exclude: list[torch.nn.Module] = ()) -> int:
    """Bytes autograd keeps for the backward of what fn() runs: the most that the storages it saves hold at once
    (parameters and buffers of the models `exclude` not counted) and, for the checkpointed blocks of those models
    (diffusers' gradient checkpointing on), their inputs plus the largest block's activations (one block is
    recomputed at a time), plus the working set of a backward that retains its graph (`_AsOnCuda`). Works on the
    meta device and on real devices alike."""
    count, cuda = _Count(exclude), _AsOnCuda()
    with _counted_checkpoints(exclude, count), torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t), cuda:
        fn()
    return count.total + cuda.retained_backward


@contextlib.contextmanager
def _counted_checkpoints(models: list[torch.nn.Module], count: _Count):
    """While active, the models among `models` with diffusers' gradient checkpointing on run their blocks through
    count.checkpointed; after, through lgd_ray.prior.checkpointed (the one function this project checkpoints with)."""
    swapped = [m for m in models if getattr(m, "is_gradient_checkpointing", False)]
    for m in swapped:
        m.enable_gradient_checkpointing(count.checkpointed)
    try:
        yield
    finally:
        for m in swapped:
            m.enable_gradient_checkpointing(checkpointed)


class _LargestOutput(TorchDispatchMode):
    """The largest tensor any op returns while active (bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def largest_output(fn) -> int:
    with _AsOnCuda(), _LargestOutput() as mode:
        fn()
    return mode.largest


@dataclass(kw_only=True)
class ActorMemory:
    """Estimated bytes of one sampler actor."""

    weights: int  # DiT + VAE (prior.dtype) + student + reference (float32)
    guided_fixed: int  # a guided step's saved tensors that do not grow with the batch
    guided_per_trajectory: int
    unguided_per_trajectory: int  # live activations of an unguided step or the final decode, per trajectory
    guidance_batch: int  # trajectories per guided backward (guidance.batch, or the sample batch)
    sample_batch: int
    guided: bool  # the run has guided steps
    deviation_held: int = 0  # the chunk's earlier latents that deviation guidance (gamma > 0) compares with

    def peak(self, guidance_batch: int | None = None) -> int:
        """Allocated bytes at the actor's peak (torch's allocator; the CUDA context not included)."""
        g = self.guidance_batch if guidance_batch is None else guidance_batch
        steps = self.sample_batch * self.unguided_per_trajectory
        if self.guided:
            steps = max(steps, self.deviation_held + self.guided_fixed + g * self.guided_per_trajectory)
        return self.weights + steps

    def largest_guidance_batch(self, budget: float) -> int:
        """The most trajectories per guided backward whose peak fits `budget` bytes of GPU (0: not even one)."""
        room = USABLE * (budget - CONTEXT_BYTES) - self.weights - self.deviation_held - self.guided_fixed
        return max(0, min(self.sample_batch, int(room // self.guided_per_trajectory)))


def _meta_prior(cfg: Config):
    m = meta_models(cfg)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(cfg.prior.num_steps)
    prior = Prior(m.dit, scheduler, m.vae)
    if cfg.guidance.checkpointing:
        prior.checkpoint_blocks()
    return prior, m


def deviation_images(cfg: Config) -> int:
    """Earlier images per class a guided step deviates from at most (gamma > 0: the last guided stage's), else 0."""
    if cfg.guidance.gamma <= 0:
        return 0
    stages = stage_plan(cfg)
    return max((sum(s.ipc for s in stages[:st.index]) for st in stages if st.gradient and st.index > 0), default=0)


def guided_step_bytes(cfg: Config, prior, student: torch.nn.Module, reference: torch.nn.Module, batch: int,
                      memory_images: int = 0) -> int:
    """Saved-tensor bytes of one guided step (the configured path, omega and sizes) of `batch` trajectories on
    `prior`'s device: meta for the estimate, a real device for a measurement (the batch in one backward).
    memory_images > 0: with deviation guidance from that many earlier latents per class."""
    device = prior.device
    x = torch.randn(batch, *prior.latent_shape, device=device)
    classes = [k % num_classes(cfg.data) for k in range(batch)]  # the data set's, as the sampler's chunks
    memory = ({c: torch.randn(memory_images, *prior.latent_shape, device=device) for c in set(classes)}
              if memory_images else None)
    tiny = None  # guidance.decoder tiny: the guided step decodes x0^ with it (random weights: shapes are what count)
    if cfg.guidance.decoder == "tiny" and prior.vae is not None:
        with torch.device(device):
            tiny = build_tiny(prior.transformer.config, prior.vae.config, cfg.guidance.tiny_width).requires_grad_(False)
    guide = Guide.from_config(cfg, Scorer(student, reference, cfg.guidance.omega), memory, batch=0, decoder=tiny)
    t = prior.scheduler.timesteps[len(prior.scheduler.timesteps) // 2]
    models = [prior.transformer, student, reference] + [m for m in (prior.vae, tiny) if m is not None]
    return saved_bytes(lambda: guide.eps(prior, x, t, classes, cfg.prior.cfg_scale, list(range(batch))), models)


def actor_memory(cfg: Config) -> ActorMemory:
    """Count a sampler actor's memory for this config on the meta device (no weights read)."""
    prior, m = _meta_prior(cfg)
    weights = sum(t.numel() * t.element_size() for mod in (m.dit, m.vae, m.student, m.reference) if mod is not None
                  for t in (*mod.parameters(), *mod.buffers()))
    k = deviation_images(cfg)
    one, two = (guided_step_bytes(cfg, prior, m.student, m.reference, b, k) for b in (1, 2))
    # the chunk's earlier latents that deviation guidance compares with, held for the chunk's whole run
    held = min(cfg.distill.classes_per_chunk, prior.num_classes) * k * torch.Size(prior.latent_shape).numel() * 4
    with torch.no_grad():
        x = torch.randn(2 if cfg.prior.cfg_scale > 1 else 1, *prior.latent_shape, device="meta")
        t = prior.scheduler.timesteps[0]
        unguided = max(largest_output(lambda: prior.eps(x[:1], t, torch.tensor([0], device="meta"), cfg.prior.cfg_scale)),
                       largest_output(lambda: prior.decode(x[:1])))
    g = cfg.guidance
    guided = any(st.gradient for st in stage_plan(cfg))
    return ActorMemory(weights=weights, guided_fixed=max(0, 2 * one - two), guided_per_trajectory=two - one,
                       unguided_per_trajectory=4 * unguided,
                       guidance_batch=min(g.batch or cfg.distill.sample_batch, cfg.distill.sample_batch),
                       sample_batch=cfg.distill.sample_batch, guided=guided, deviation_held=held)


def actor_gpu_bytes(cfg: Config, gpus: float | None = None) -> tuple[float, str]:
    """GPU memory one sampler actor (or a process given `gpus` GPUs) may use (bytes) and how that was decided."""
    r = cfg.ray
    gpus = r.num_gpus_per_actor if gpus is None else gpus
    if r.gpu_memory_gb:
        gb, what = r.gpu_memory_gb, f"ray.gpu_memory_gb {r.gpu_memory_gb:g}"
    else:
        kind = r.accelerator_type or DEFAULT_GPU
        if kind not in GPU_MEMORY_GB:
            raise ConfigError(f"config: GPU memory of accelerator type {kind!r} unknown; set ray.gpu_memory_gb")
        gb = GPU_MEMORY_GB[kind]
        what = f"{kind} {gb} GB" + ("" if r.accelerator_type else " (ray.accelerator_type unset: assumed)")
    return gpus * gb * 1e9, f"{gpus:g} x {what}"


def check_fits(cfg: Config, mem: ActorMemory | None = None) -> ActorMemory | None:
    """Refuse, in one line naming the key to change, a config whose sampler actor cannot fit its GPU share.
    None (nothing checked) for CPU actors, for method random (no prior) and before an `auto` share or guidance.batch
    is sized."""
    if not cfg.ray.num_gpus_per_actor or not method_of(cfg).needs_prior or cfg.guidance.batch is AUTO:
        return None
    mem = mem or actor_memory(cfg)
    budget, what = actor_gpu_bytes(cfg)
    room = USABLE * (budget - CONTEXT_BYTES)
    if mem.weights + mem.sample_batch * mem.unguided_per_trajectory > room:
        raise ConfigError(f"config: a sampler actor needs {(mem.weights + mem.sample_batch * mem.unguided_per_trajectory) / GIB:.1f} "
                          f"GiB for unguided batches of distill.sample_batch {mem.sample_batch}; it has {budget / GIB:.1f} "
                          f"GiB ({what}): lower distill.sample_batch or raise ray.num_gpus_per_actor")
    if mem.guided and mem.peak() > room:
        fits = mem.largest_guidance_batch(budget)
        fix = (f"set guidance.batch={fits}" if fits else
               "one trajectory does not fit: raise ray.num_gpus_per_actor or use prior.dtype=bfloat16")
        raise ConfigError(f"config: a guided step of guidance.batch {mem.guidance_batch} needs {mem.peak() / GIB:.1f} GiB "
                          f"per sampler actor ({mem.guided_per_trajectory / GIB:.2f} GiB per trajectory + "
                          f"{mem.weights / GIB:.1f} GiB weights); it has {budget / GIB:.1f} GiB ({what}): {fix}")
    return mem


def size_guidance_batch(cfg: Config, gpus: float) -> Config:
    """The config with guidance.batch `auto` sized for a sampler of `gpus` GPUs (an actor's share, or 1 for a run in
    this process on CUDA): the largest guided backward that fits by the meta-device count, at most the sample batch
    (at least 1: check_fits refuses what one trajectory cannot fit); 0 (the whole sample batch) on the CPU. Said in one
    line. Out of memory all the same, the actor halves it (lgd_ray.batching)."""
    if cfg.guidance.batch is not AUTO:
        return cfg
    size, why = 0, "CPU sampler: the whole sample batch"
    if gpus and method_of(cfg).needs_prior:
        budget, what = actor_gpu_bytes(cfg, gpus)
        size = max(1, actor_memory(cfg).largest_guidance_batch(budget))
        why = f"the largest guided backward that {what} holds by the meta-device count"
    print(f"guidance: batch auto -> {size} ({why})", flush=True)
    return replace(cfg, guidance=replace(cfg.guidance, batch=size))


def format_memory(cfg: Config, mem: ActorMemory) -> str:
    """The dry-run's memory lines."""
    line = (f"memory per sampler actor (estimate, meta-device count): weights {mem.weights / GIB:.2f} GiB; unguided "
            f"batch of {mem.sample_batch}: {mem.sample_batch * mem.unguided_per_trajectory / GIB:.2f} GiB")
    if mem.guided:
        line += (f"; guided step {mem.guided_per_trajectory / GIB:.3f} GiB per trajectory + {mem.guided_fixed / GIB:.2f} "
                 + (f"GiB + {mem.deviation_held / GIB:.2f} GiB of earlier latents (gamma {cfg.guidance.gamma:g}: "
                    "its gradient batched with S's through the DiT) " if mem.deviation_held else "GiB ")
                 + f"at guidance.batch {mem.guidance_batch}: peak {mem.peak() / GIB:.1f} GiB")
    if not cfg.ray.num_gpus_per_actor:
        return line + (" (CPU actors: host memory)" if cfg.ray.num_gpus_per_actor == 0 else
                       " (ray.num_gpus_per_actor auto: a share of the cluster's GPUs, host memory without)")
    budget, what = actor_gpu_bytes(cfg)
    line += f"; the actor's GPU share: {budget / GIB:.1f} GiB ({what})"
    if mem.guided:
        line += f"; the largest guidance.batch that fits: {mem.largest_guidance_batch(budget)}"
    return line


@dataclass(kw_only=True)
class FitMemory:
    """Estimated bytes of one Ray Train worker of the prior's fit (the pixel DiT, or prior.base fine-tuned)."""

    state: int  # float32 weights, their gradients, AdamW's two moments and the EMA copy
    fixed: int  # saved activations that do not grow with the batch
    per_image: int  # saved activations per image of the worker's batch
    batch: int  # images per worker and step (prior.batch_size / ray.train_workers)

    def peak(self) -> int:
        return self.state + self.fixed + self.batch * self.per_image


def prior_fit_memory(cfg: Config, workers: int) -> FitMemory:
    """Count a prior fit's memory per worker on the meta device, with prior.checkpointing and prior.autocast (bfloat16
    activations counted as such; ops autocast keeps in float32 make the real count a little higher)."""
    p = cfg.prior
    m = meta_models(replace(cfg, prior=replace(p, model_id=p.base, dtype="float32")))
    dit = m.dit.train().requires_grad_(True)
    params = sum(t.numel() for t in dit.parameters())
    if p.checkpointing:
        dit.enable_gradient_checkpointing(checkpointed)
    dtype = torch.bfloat16 if p.autocast == "bfloat16" else torch.float32
    net = torch.nn.Module.to(dit, dtype)  # the count's stand-in for autocast: activations in its dtype
    s, c = net.config.sample_size, net.config.in_channels

    def step(b: int) -> int:
        x = torch.randn(b, c, s, s, device="meta", dtype=dtype)
        t, y = torch.zeros(b, dtype=torch.long, device="meta"), torch.zeros(b, dtype=torch.long, device="meta")
        return saved_bytes(lambda: net(x, timestep=t, class_labels=y).sample.float().pow(2).mean(), [net])

    one, two = step(1), step(2)
    return FitMemory(state=params * 4 * 5, fixed=max(0, 2 * one - two), per_image=two - one,
                     batch=max(1, p.batch_size // max(1, workers)))


def format_fit_memory(cfg: Config, mem: FitMemory, workers: int) -> str:
    """The dry-run's line for the prior's fit."""
    line = (f"memory per Ray Train worker of the prior's fit (estimate, meta-device count): {mem.state / GIB:.2f} GiB "
            f"weights, gradients, AdamW and EMA + {mem.per_image / GIB:.3f} GiB per image x {mem.batch} images "
            f"(prior.batch_size {cfg.prior.batch_size} / {workers} workers): peak {mem.peak() / GIB:.1f} GiB")
    r = cfg.ray
    if not (r.enabled and r.train_use_gpu is True):
        return line + " (CPU workers: host memory)"
    budget, what = actor_gpu_bytes(cfg, r.train_gpus_per_worker)
    line += f"; the worker's GPU share: {budget / GIB:.1f} GiB ({what})"
    room, batch = USABLE * (budget - CONTEXT_BYTES), cfg.prior.batch_size
    if mem.peak() > room:  # the fewest workers (each an equal part of the batch) whose share fits
        fits = [w for w in range(1, batch + 1) if not batch % w and mem.state + mem.fixed + batch // w * mem.per_image <= room]
        line += f": fits from {fits[0]} workers" if fits else ": does not fit at any number of workers"
    return line


def check_fit_fits(cfg: Config, workers: int, mem: FitMemory | None = None) -> FitMemory | None:
    """Refuse, in one line naming the keys to change, a prior fit on GPU workers that cannot fit one worker's GPU
    share (the samplers' check, for the fit); None (nothing checked) for CPU workers."""
    r = cfg.ray
    if not (r.enabled and r.train_use_gpu is True):  # not False, not an unsized auto
        return None
    mem = mem or prior_fit_memory(cfg, workers)
    budget, what = actor_gpu_bytes(cfg, r.train_gpus_per_worker)
    if mem.peak() > USABLE * (budget - CONTEXT_BYTES):
        raise ConfigError(f"config: the prior's fit needs {mem.peak() / GIB:.1f} GiB per Ray Train worker "
                          f"({mem.state / GIB:.1f} GiB weights, gradients, AdamW and EMA + {mem.per_image / GIB:.2f} GiB "
                          f"per image x {mem.batch} images of prior.batch_size {cfg.prior.batch_size} / {workers} "
                          f"workers); it has {budget / GIB:.1f} GiB ({what}): set prior.checkpointing=true or "
                          "prior.autocast=bfloat16, or more ray.train_workers")
    return mem
