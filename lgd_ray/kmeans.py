"""k-means with the clusters ordered largest first: the modes of mgd3 and the diversity step of dds."""
from __future__ import annotations

import torch


def largest_first(points: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """k-means (k clusters, 3 seeded starts) of `points` (N, ...): (each point's cluster, the centres (k, ...),
    the cluster indices ordered by size, largest first, ties by index)."""
    from sklearn.cluster import KMeans  # here: scikit-learn adds ~0.6 s to every sampler actor's start, most never use it

    km = KMeans(n_clusters=k, n_init=3, random_state=seed % (1 << 31)).fit(points.flatten(1).double().numpy())
    labels = torch.from_numpy(km.labels_).long()
    sizes = torch.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda j: (-int(sizes[j]), j))
    return labels, torch.from_numpy(km.cluster_centers_).to(points.dtype).view(k, *points.shape[1:]), order
