"""The LGD terms: the learnability score, learnability guidance of the noise prediction, deviation guidance.

    S(x, y) = CE(student(x), y) - omega * CE(reference(x), y)        high S: learnable, not yet learned

Guided noise prediction at a step t inside the window (eps^ classifier-free guided, abar_t the scheduler's):

    eps~ = eps^ - norm_scale * sqrt(1 - abar_t) * ||eps^|| * (lambda * g_S / ||g_S|| - gamma * g_D / ||g_D||)

with g_S = grad_{x_t} S(decode(x0^), y), g_D = grad_{x_t} max_m cos(x0^, m) over the class's memory of already
chosen latents, x0^ = (x_t - sqrt(1 - abar_t) eps^) / sqrt(abar_t). With guidance.augment = K > 0, S in g_S is the mean of S over K
random views of decode(x0^) (the student's training crops and flips, differentiable, drawn per image from (run seed,
stage, class, slot, t)), so the step follows what survives augmentation (robust guidance). Subtracting from eps moves x0^ along +g_S:
higher S, and away from the memory. The norms are per image, so lambda is the guidance's size relative to the
noise prediction's (rho_t of docs/DESIGN.md section 1, with the constant norm_scale), whatever the scale of the gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lgd_ray.batching import BatchSize
from lgd_ray.config import Config
from lgd_ray.prior import Prior
from lgd_ray.seeding import derive_seed, generator
from lgd_ray.train import augment


def classifier_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Decoded images -> the classifiers' input: clamped to [-1, 1], resized to size x size."""
    images = images.clamp(-1, 1)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


@dataclass
class Scorer:
    """The learnability score of images for their labels under the current student and the reference."""

    student: torch.nn.Module
    reference: torch.nn.Module
    omega: float

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        """(S, CE of the student, CE of the reference), each of shape (N,)."""
        ce_student = F.cross_entropy(self.student(images), labels, reduction="none")
        ce_reference = F.cross_entropy(self.reference(images), labels, reduction="none")
        return ce_student - self.omega * ce_reference, ce_student, ce_reference


def nearest_cosine(x0: torch.Tensor, classes: list[int], memory: dict[int, torch.Tensor]) -> torch.Tensor:
    """Per sample, the largest cosine similarity between x0 and the memory latents of its class (classes: each
    sample's; 0 if the class has none)."""
    flat = F.normalize(x0.flatten(1), dim=1)
    sims = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
    for c in sorted(set(classes)):
        mem = memory.get(c)
        if mem is None or len(mem) == 0:
            continue
        rows = torch.tensor([k for k, y in enumerate(classes) if y == c], device=x0.device)
        m = F.normalize(mem.to(x0).flatten(1), dim=1)
        sims = sims.index_put((rows,), (flat[rows] @ m.T).amax(1))
    return sims


def in_window(step_index: int, window: tuple[int, int], every: int) -> bool:
    """Whether a step index (counting down from num_steps - 1) follows the gradient: inside the window, and every
    `every`-th from its noisy end (guidance.every; 1 = all of them)."""
    return window[0] <= step_index <= window[1] and (window[1] - step_index) % every == 0


def guidance_batch_size(size: int) -> BatchSize:
    """guidance.batch as the BatchSize of the guided backward (0: every trajectory of a sampler batch at once)."""
    return BatchSize(size, "guidance", "trajectories per guided backward", "guidance.batch",
                     "guidance: out of GPU memory with one trajectory per guided backward: set prior.dtype=bfloat16 or "
                     "guidance.checkpointing=true, or give each actor more GPU (ray.num_gpus_per_actor)")


def guided_steps(window: tuple[int, int], every: int, num_steps: int) -> list[int]:
    """The step indices that follow the gradient, noisiest first."""
    return [s for s in reversed(range(num_steps)) if in_window(s, window, every)]


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))


@dataclass
class Guide:
    """Settings of learnability and deviation guidance for one sampling run."""

    scorer: Scorer
    lambda_: float
    gamma: float
    window: tuple[int, int]  # step indices counting down from num_steps - 1, inclusive
    through: str  # "denoiser": gradient through the DiT too; "decoder": eps^ detached
    norm_scale: float
    image_size: int
    memory: dict[int, torch.Tensor] = field(default_factory=dict)
    # trajectories per backward (guidance.batch; 0 = all at once): bounds the memory of a guided step; halved on
    # out-of-memory for the guide's lifetime (an int given here becomes a BatchSize; the sampler actor's is shared by
    # every guide it makes)
    batch: BatchSize | int = 0
    every: int = 1  # guidance.every: follow the gradient at every this-many-th step of the window
    views: int = 0  # guidance.augment: random views per image that S is averaged over in g_S; 0 = the image itself
    crop_scale: float = 1.0  # the views: RandomResizedCrop(scale=(crop_scale, 1)) ...
    flip: bool = False  # ... and horizontal flips (the student's training augmentation)
    view_seed: int = 0  # the views of (class, slot) at timestep t are drawn from (view_seed, class, slot, t)
    decoder: torch.nn.Module | None = None  # x0^ -> images in the guided step (guidance.decoder tiny); None: the prior's

    def __post_init__(self):
        if not isinstance(self.batch, BatchSize):
            self.batch = guidance_batch_size(self.batch)

    @classmethod
    def from_config(cls, cfg: Config, scorer: Scorer, memory: dict[int, torch.Tensor] | None = None,
                    batch: BatchSize | int | None = None, stage: int = 0,
                    decoder: torch.nn.Module | None = None) -> "Guide":
        """The guide of the config's guidance keys (what the sampler actors, the memory count and the benches use).
        memory: the deviation memory per class; batch: trajectories per backward (None: guidance.batch); stage: the
        stage whose views are drawn (with guidance.augment); decoder: the tiny decoder (guidance.decoder tiny)."""
        g, train = cfg.guidance, cfg.student.train
        return cls(scorer, g.lambda_, g.gamma, tuple(g.window), g.through, g.norm_scale, cfg.data.image_size,
                   memory or {}, g.batch if batch is None else batch, g.every, g.augment, train.crop_scale, train.flip,
                   derive_seed(cfg.seed, "augment", stage), decoder)

    def active(self, step_index: int) -> bool:
        return (self.lambda_ > 0 or self.gamma > 0) and in_window(step_index, self.window, self.every)

    def eps(self, prior: Prior, x_t: torch.Tensor, t: torch.Tensor, classes: list[int], cfg_scale: float,
            slots: list[int] | None = None):
        """The guided noise prediction eps~ (detached), `batch` trajectories at a time (every term is per image, so
        the chunks give the result of the whole batch). Out of GPU memory, the step is run again at half the batch
        (kept for the later steps), down to one trajectory. classes, slots: each trajectory's class and slot (the
        slot seeds its views), as lists: nothing is read back from the device (so the dry-run's count on the meta
        device runs this very code)."""
        if self.views and slots is None:
            raise ValueError("augmented guidance needs each trajectory's slot")
        return torch.cat(self.batch.run(len(x_t), lambda i, j: self._eps(
            prior, x_t[i:j], t, classes[i:j], cfg_scale, slots[i:j] if slots is not None else None), x_t.device))

    def score(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int], slots: list[int] | None,
              t: int) -> torch.Tensor:
        """S of each image for its label (`classes`: the same, as a list: what seeds the views), or with views > 0
        the mean S of its random views."""
        if not self.views:
            return self.scorer(images, labels)[0]
        views = torch.cat([augment(images[i:i + 1].expand(self.views, -1, -1, -1),
                                   generator(self.view_seed, c, s, t), self.crop_scale, self.flip)
                           for i, (c, s) in enumerate(zip(classes, slots))])
        return self.scorer(views, labels.repeat_interleave(self.views))[0].view(len(images), self.views).mean(1)

    def _eps(self, prior: Prior, x_t: torch.Tensor, t: torch.Tensor, classes: list[int], cfg_scale: float,
             slots: list[int] | None):
        _, sigma = prior.signal_noise(t, x_t)
        labels = torch.tensor(classes, device=x_t.device)
        use_memory = self.gamma > 0 and any(len(self.memory.get(c, ())) for c in set(classes))
        with torch.enable_grad():
            if self.through == "denoiser":
                wrt = x_t.detach().requires_grad_(True)
                eps = prior.eps(wrt, t, labels, cfg_scale)
                x0 = prior.x0(wrt, t, eps)
            else:  # d x0^ / d x_t = 1 / sqrt(abar_t): a positive constant that the normalisation removes
                with torch.no_grad():
                    eps = prior.eps(x_t, t, labels, cfg_scale)
                x0 = wrt = prior.x0(x_t, t, eps).requires_grad_(True)
            step = torch.zeros_like(eps)
            if self.lambda_ > 0:
                decode = prior.decode if self.decoder is None else self.decoder
                score = self.score(classifier_input(decode(x0), self.image_size), labels, classes, slots, int(t))
            if self.lambda_ > 0 and use_memory and wrt is not x0:
                # both gradients through the DiT in one batched backward: d S / d x0^ and d cos / d x0^ first (graphs
                # apart past x0^, each freed as it is used), then x0^ -> x_t once for the two (the same numbers as two
                # backwards on the CPU, and no backward that keeps its graph)
                (g_s0,) = torch.autograd.grad(score.sum(), x0)
                (g_d0,) = torch.autograd.grad(nearest_cosine(x0, classes, self.memory).sum(), x0)
                g_s, g_d = torch.autograd.grad(x0, wrt, torch.stack([g_s0, g_d0]), is_grads_batched=True)[0]
                step = self.lambda_ * _unit(g_s) - self.gamma * _unit(g_d)
            else:
                if self.lambda_ > 0:
                    (g_s,) = torch.autograd.grad(score.sum(), wrt, retain_graph=use_memory)
                    step = step + self.lambda_ * _unit(g_s)
                if use_memory:
                    (g_d,) = torch.autograd.grad(nearest_cosine(x0, classes, self.memory).sum(), wrt)
                    step = step - self.gamma * _unit(g_d)
        eps = eps.detach()
        eps_norm = eps.flatten(1).norm(dim=1).view(-1, *[1] * (eps.dim() - 1))
        return eps - self.norm_scale * sigma * eps_norm * step
