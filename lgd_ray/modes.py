"""MGD3 (mode-guided diffusion): k-means modes of each class's real data, and the pull of x0^ towards a mode.

While the step index is at least `stop` (the noisy first part of sampling), the predicted clean sample moves
towards the trajectory's mode and the noise prediction is made consistent with it:

    x0^ <- x0^ + lambda_m * sigma_t * (m - x0^),      eps <- (x_t - sqrt(abar_t) x0^) / sigma_t

No classifier and no gradient. Slot s of a class follows mode s, so the run's slots spread over its modes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.cluster import KMeans

from lgd_ray.prior import Prior


def class_modes(points: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means centres of `points` (N, ...) with k = the run's images per class, largest cluster first."""
    if len(points) < k:
        raise ValueError(f"mgd3: {k} modes need at least {k} real images of the class, got {len(points)}")
    flat = points.flatten(1).double().numpy()
    km = KMeans(n_clusters=k, n_init=3, random_state=seed % (1 << 31)).fit(flat)
    sizes = torch.bincount(torch.from_numpy(km.labels_).long(), minlength=k)
    order = sorted(range(k), key=lambda j: (-int(sizes[j]), j))
    centres = torch.from_numpy(km.cluster_centers_).to(points.dtype)
    return centres[order].view(k, *points.shape[1:])


@dataclass
class ModeGuide:
    """Mode guidance for one sampling run: `modes[c][s]` is the target of class c, slot s."""

    modes: dict[int, torch.Tensor]
    lambda_: float
    stop: int  # guided while the step index (counting down from num_steps - 1) is >= stop

    def active(self, step_index: int) -> bool:
        return self.lambda_ > 0 and step_index >= self.stop

    @torch.no_grad()
    def eps(self, prior: Prior, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg_scale: float,
            slots: list[int]) -> torch.Tensor:
        eps = prior.eps(x_t, t, labels, cfg_scale)
        abar = prior.scheduler.alphas_cumprod[int(t)].to(x_t)
        sigma, alpha = (1 - abar).sqrt(), abar.sqrt()
        x0 = (x_t - sigma * eps) / alpha
        target = torch.stack([self.modes[c][s] for c, s in zip(labels.tolist(), slots)]).to(x0)
        x0 = x0 + self.lambda_ * sigma * (target - x0)
        return (x_t - alpha * x0) / sigma
