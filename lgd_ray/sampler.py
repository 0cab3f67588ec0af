"""Batched DDIM / DDPM sampling of a DiT with classifier-free guidance, LGD guidance and rank selection.

Every trajectory draws its noise from its own generator, seeded from (run seed, stage, class, slot, candidate),
and every model here treats the images of a batch independently: an image does not depend on its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lgd_ray.data import to_float, to_uint8
from lgd_ray.guidance import Guide, Scorer, classifier_input
from lgd_ray.modes import ModeGuide
from lgd_ray.prior import Prior
from lgd_ray.seeding import generator


def sample(prior: Prior, labels: torch.Tensor, gens: list[torch.Generator], num_steps: int, cfg_scale: float,
           guide: Guide | ModeGuide | None = None, slots: list[int] | None = None) -> torch.Tensor:
    """Final latents (or pixels) for `labels`, one generator per trajectory (initial noise, then DDPM noise).

    slots: each trajectory's slot (what a ModeGuide needs to pick its mode).
    """
    x = torch.cat([torch.randn((1, *prior.latent_shape), generator=g) for g in gens]).to(prior.device)
    labels = labels.to(prior.device)
    sched = prior.scheduler
    sched.set_timesteps(num_steps)
    for i, t in enumerate(sched.timesteps):
        step_index = len(sched.timesteps) - 1 - i  # counts down: the noisiest step is num_steps - 1
        if guide is not None and guide.active(step_index):
            eps = guide.eps(prior, x, t, labels, cfg_scale, slots)
        else:
            with torch.no_grad():
                eps = prior.eps(x, t, labels, cfg_scale)
        x = sched.step(eps, t, x, generator=gens).prev_sample
    return x


@dataclass
class Generated:
    """One chosen image and its scores (None where no student exists yet)."""

    cls: int
    slot: int
    image: torch.Tensor  # uint8 (C, H, W)
    score: float | None
    ce_student: float | None
    ce_reference: float | None
    candidate: int  # index of the chosen candidate among kappa
    candidate_scores: list[float]


def generate(prior: Prior, items: list[tuple[int, int]], *, run_seed: int, stage: int, num_steps: int,
             cfg_scale: float, batch_size: int, image_size: int, kappa: int = 1, scorer: Scorer | None = None,
             guide: Guide | ModeGuide | None = None) -> list[Generated]:
    """Sample kappa candidates for each (class, slot), keep the one with the highest S (learnability rank selection).

    Candidates run in batches of `batch_size` trajectories; with no scorer kappa must be 1 and scores are None.
    """
    if kappa > 1 and scorer is None:
        raise ValueError("rank selection (kappa > 1) needs a scorer")
    trajectories = [(c, s, k) for c, s in items for k in range(kappa)]
    images, scores = [], []
    for i in range(0, len(trajectories), batch_size):
        batch = trajectories[i:i + batch_size]
        labels = torch.tensor([c for c, _, _ in batch])
        gens = [generator(run_seed, "noise", stage, c, s, k) for c, s, k in batch]
        z = sample(prior, labels, gens, num_steps, cfg_scale, guide, [s for _, s, _ in batch])
        with torch.no_grad():
            x = classifier_input(prior.decode(z), image_size).float()
            x = to_uint8(x).cpu()  # score what is stored: the quantised image
            if scorer is not None:
                s, ce_s, ce_r = scorer(to_float(x).to(prior.device), labels.to(prior.device))
                scores += list(zip(s.tolist(), ce_s.tolist(), ce_r.tolist()))
        images.append(x)
    images = torch.cat(images)
    out = []
    for j, (c, s) in enumerate(items):
        rows = range(j * kappa, (j + 1) * kappa)
        if scorer is None:
            out.append(Generated(c, s, images[rows[0]], None, None, None, 0, []))
            continue
        best = max(rows, key=lambda r: scores[r][0])
        out.append(Generated(c, s, images[best], *scores[best], best - rows[0], [scores[r][0] for r in rows]))
    return out
