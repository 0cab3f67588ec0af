"""Batched DDIM / DDPM sampling of a DiT with classifier-free guidance, LGD guidance and rank selection.

Every trajectory draws its noise from its own generator, seeded from (run seed, stage, class, slot, candidate),
and every model here treats the images of a batch independently: an image does not depend on its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lgd_ray.batching import BatchSize
from lgd_ray.data import to_float, to_uint8
from lgd_ray.guidance import Guide, Scorer, classifier_input
from lgd_ray.modes import ModeGuide
from lgd_ray.prior import Prior
from lgd_ray.seeding import generator


def sample(prior: Prior, labels: torch.Tensor, gens: list[torch.Generator], num_steps: int, cfg_scale: float,
           guide: Guide | ModeGuide | None = None, slots: list[int] | None = None, x: torch.Tensor | None = None,
           first: int | None = None, last: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the step indices first..last (counting down; default: all, from num_steps - 1) for `labels`, one generator
    per trajectory (initial noise when x is None, then DDPM noise); returns (x after step `last`, the scheduler's x0^
    of that step). A run cut in two (first..r, then r-1..0 from the returned x) equals the uncut run.

    slots: each trajectory's slot (what a ModeGuide needs to pick its mode).
    """
    if x is None:
        x = torch.cat([torch.randn((1, *prior.latent_shape), generator=g) for g in gens])
    classes = labels.tolist()  # the guides take each trajectory's class as a list (no read-back from the device)
    x, labels = x.to(prior.device), labels.to(prior.device)
    first = num_steps - 1 if first is None else first
    sched = prior.scheduler
    sched.set_timesteps(num_steps)
    x0 = x
    for i, t in enumerate(sched.timesteps):
        step_index = len(sched.timesteps) - 1 - i  # counts down: the noisiest step is num_steps - 1
        if not last <= step_index <= first:
            continue
        if guide is not None and guide.active(step_index):
            eps = guide.eps(prior, x, t, classes, cfg_scale, slots)
        else:
            with torch.no_grad():
                eps = prior.eps(x, t, labels, cfg_scale)
        out = sched.step(eps, t, x, generator=gens)
        x, x0 = out.prev_sample, out.pred_original_sample
    return x, x0


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


def sample_batch_size(size: int) -> BatchSize:
    """The trajectories per batch of unguided sampling, the final decode and scoring, and early selection."""
    return BatchSize(size, "sampler", "trajectories per batch", "distill.sample_batch",
                     "sampler: out of GPU memory with one trajectory per batch: set prior.dtype=bfloat16, or give each "
                     "actor more GPU (ray.num_gpus_per_actor)")


def generate(prior: Prior, items: list[tuple[int, int]], *, run_seed: int, stage: int, num_steps: int,
             cfg_scale: float, batch_size: int | BatchSize, image_size: int, kappa: int = 1,
             scorer: Scorer | None = None, guide: Guide | ModeGuide | None = None,
             select_after: int = 0) -> list[Generated]:
    """Sample kappa candidates for each (class, slot), keep the one with the highest S (learnability rank selection).

    Candidates run in batches of `batch_size` trajectories (a BatchSize: halved on out-of-memory, the same images);
    with no scorer kappa must be 1 and scores are None.
    select_after (early rejection, guidance.select_after): with 0 < select_after < num_steps, the candidates run that
    many steps, the one whose x0^ has the highest S is kept and only it runs the rest (candidate_scores are then the
    candidates' S at that point); 0 = every candidate runs to the end and the final images are ranked (the paper's).
    """
    if kappa > 1 and scorer is None:
        raise ValueError("rank selection (kappa > 1) needs a scorer")
    trajectories = [(c, s, k) for c, s in items for k in range(kappa)]
    gens = [generator(run_seed, "noise", stage, c, s, k) for c, s, k in trajectories]
    early = kappa > 1 and 0 < select_after < num_steps
    sizes = batch_size if isinstance(batch_size, BatchSize) else sample_batch_size(batch_size)
    run = lambda rows, **kw: _batched(prior, [trajectories[r] for r in rows], [gens[r] for r in rows], sizes,
                                      num_steps, cfg_scale, guide, **kw)
    rows = list(range(len(trajectories)))
    chosen = [j * kappa for j in range(len(items))]
    early_scores = None
    if early:
        pause = num_steps - select_after  # the first step index the survivors run alone
        x, x0 = run(rows, last=pause)
        with torch.no_grad():
            labels = torch.tensor([c for c, _, _ in trajectories], device=prior.device)
            early_scores = torch.cat(sizes.run(len(rows), lambda i, j: scorer(
                classifier_input(prior.decode(x0[i:j].to(prior.device)), image_size), labels[i:j])[0].cpu(), prior.device))
        early_scores = early_scores.view(len(items), kappa).cpu()
        chosen = [j * kappa + int(early_scores[j].argmax()) for j in range(len(items))]
        x, _ = run(chosen, x=x[chosen], first=pause - 1)
        rows = chosen
    else:
        x, _ = run(rows)

    def final(i: int, j: int) -> tuple[torch.Tensor, list]:
        labels = torch.tensor([trajectories[r][0] for r in rows[i:j]], device=prior.device)
        img = to_uint8(classifier_input(prior.decode(x[i:j].to(prior.device)), image_size).float()).cpu()
        if scorer is None:
            return img, []
        s, ce_s, ce_r = scorer(to_float(img).to(prior.device), labels)  # score what is stored
        return img, list(zip(s.tolist(), ce_s.tolist(), ce_r.tolist()))

    with torch.no_grad():
        parts = sizes.run(len(rows), final, prior.device)
    images, scores = torch.cat([p[0] for p in parts]), [s for p in parts for s in p[1]]
    out = []
    for j, (c, s) in enumerate(items):
        if scorer is None:
            out.append(Generated(c, s, images[j], None, None, None, 0, []))
        elif early:
            k = chosen[j] - j * kappa
            out.append(Generated(c, s, images[j], *scores[j], k, early_scores[j].tolist()))
        else:
            cand = range(j * kappa, (j + 1) * kappa)
            best = max(cand, key=lambda r: scores[r][0])
            out.append(Generated(c, s, images[best], *scores[best], best - cand[0], [scores[r][0] for r in cand]))
    return out


def _batched(prior: Prior, trajectories: list[tuple[int, int, int]], gens: list[torch.Generator], sizes: BatchSize,
             num_steps: int, cfg_scale: float, guide, x: torch.Tensor | None = None, first: int | None = None,
             last: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` over (class, slot, candidate) trajectories in batches of sizes.size; (x, x0^) of all, on the CPU."""
    states = [g.get_state() for g in gens]  # a batch run again at a smaller size draws the same noise

    def one(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = trajectories[i:j]
        xb, x0b = sample(prior, torch.tensor([c for c, _, _ in batch]), gens[i:j], num_steps, cfg_scale, guide,
                         [s for _, s, _ in batch], None if x is None else x[i:j], first, last)
        return xb.cpu(), x0b.cpu()

    def rewind(i: int, j: int):
        for g, state in zip(gens[i:j], states[i:j]):
            g.set_state(state)

    parts = sizes.run(len(trajectories), one, prior.device, rewind)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
