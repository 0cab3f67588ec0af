"""MGD3 (mode-guided diffusion): k-means modes of each class's real data, and the pull of x0^ towards a mode.

While the step index is at least `stop` (the noisy first part of sampling), the predicted clean sample moves
towards the trajectory's mode and the noise prediction is made consistent with it:

    x0^ <- x0^ + lambda_m * sigma_t * (m - x0^),      eps <- (x_t - sqrt(abar_t) x0^) / sigma_t

No classifier and no gradient. Slot s of a class follows mode s, so the run's slots spread over its modes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lgd_ray.kmeans import largest_first
from lgd_ray.prior import Prior


def class_modes(points: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means centres of `points` (N, ...) with k = the run's images per class, largest cluster first."""
    if len(points) < k:
        raise ValueError(f"mgd3: {k} modes need at least {k} real images of the class, got {len(points)}")
    _, centres, order = largest_first(points, k, seed)
    return centres[order]


@dataclass
class ModeGuide:
    """Mode guidance for one sampling run: `modes[c][s]` is the target of class c, slot s."""

    modes: dict[int, torch.Tensor]
    lambda_: float
    stop: int  # guided while the step index (counting down from num_steps - 1) is >= stop

    def active(self, step_index: int) -> bool:
        return self.lambda_ > 0 and step_index >= self.stop

    @torch.no_grad()
    def eps(self, prior: Prior, x_t: torch.Tensor, t: torch.Tensor, classes: list[int], cfg_scale: float,
            slots: list[int]) -> torch.Tensor:
        eps = prior.eps(x_t, t, torch.tensor(classes, device=x_t.device), cfg_scale)
        alpha, sigma = prior.signal_noise(t, x_t)
        x0 = prior.x0(x_t, t, eps)
        target = torch.stack([self.modes[c][s] for c, s in zip(classes, slots)]).to(x0)
        x0 = x0 + self.lambda_ * sigma * (target - x0)
        return (x_t - alpha * x0) / sigma
