"""How close a generated set is to the real one, in a classifier's penultimate feature space: Fréchet distance
(FID's formula on other features) and k-NN precision / recall (Kynkäänniemi et al. 2019), overall and per class.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from lgd_ray.models import penultimate


def features(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Penultimate features of float images in [-1, 1] (float64, CPU)."""
    return torch.cat([penultimate(model, images[i:i + batch]).double().cpu() for i in range(0, len(images), batch)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets (rows are samples)."""
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    with warnings.catch_warnings():  # singular when there are fewer samples than dimensions (see `fidelity`)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root  # numerical imaginary parts of a PSD product's root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def _covered(points: torch.Tensor, manifold: torch.Tensor, k: int) -> float:
    """Share of `points` inside some manifold sample's ball of radius = its distance to its k-th nearest neighbour."""
    radii = torch.cdist(manifold, manifold).kthvalue(k + 1, dim=1).values  # +1: the sample itself is at 0
    return (torch.cdist(points, manifold) <= radii[None]).any(1).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Precision: share of generated samples on the real manifold; recall: share of real samples on the generated one.

    k = 5, not the paper's 3: its sets had 50k samples; with 450 real digits against 450 others, k = 3 / 5 / 10 give
    0.68 / 0.86 / 0.98 precision (real vs real), 0.00 / 0.00 / 0.02 for noise images."""
    return _covered(fake, real, k), _covered(real, fake, k)


def fidelity(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
             k: int = 5) -> dict:
    """Fréchet distance and precision / recall of feature sets: overall, and per class (mean over classes, and each).
    With fewer samples than feature dimensions the covariances are singular and the distance is biased upwards:
    compare distances only at equal sample sizes (the bench prints real vs real as the floor)."""
    precision, recall = precision_recall(real, fake, k)
    per_class = []
    for c in sorted(set(fake_labels.tolist())):
        r, f = real[real_labels == c], fake[fake_labels == c]
        p_c, r_c = precision_recall(r, f, k)
        per_class.append({"class": c, "fd": frechet_distance(r, f), "precision": p_c, "recall": r_c})
    mean = lambda key: float(np.mean([row[key] for row in per_class]))
    return {"fd": frechet_distance(real, fake), "precision": precision, "recall": recall,
            "class_fd": mean("fd"), "class_precision": mean("precision"), "class_recall": mean("recall"),
            "per_class": per_class}
