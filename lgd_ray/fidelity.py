"""How close a generated set is to the real one, in a classifier's penultimate feature space: Fréchet distance
(FID's formula on other features) and k-NN precision / recall (Kynkäänniemi et al. 2019), overall and per class.
"""
from __future__ import annotations

import numpy as np
import torch

from lgd_ray.models import penultimate


def features(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Penultimate features of float images in [-1, 1] (float64, CPU)."""
    return torch.cat([penultimate(model, images[i:i + batch]).double().cpu() for i in range(0, len(images), batch)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets (rows are samples).

    With A, B the centred samples over sqrt(n - 1) (so C_a = A^T A) and R_a, R_b their QR factors (A = Q_a R_a),
    Tr((C_a C_b)^(1/2)) is the nuclear norm of A B^T, that is of R_a R_b^T: exact, without a d x d matrix square
    root (singular, and slow, whenever there are fewer samples than dimensions)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ra = torch.linalg.qr((a - mu_a) / (len(a) - 1) ** 0.5, mode="r").R
    rb = torch.linalg.qr((b - mu_b) / (len(b) - 1) ** 0.5, mode="r").R
    cross = torch.linalg.svdvals(ra @ rb.T).sum()
    return float(((mu_a - mu_b) ** 2).sum() + ra.square().sum() + rb.square().sum() - 2 * cross)


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
