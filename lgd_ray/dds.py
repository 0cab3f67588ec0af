"""DDS (diffusion-driven selection, Zhong et al.) adapted to a class-conditional DiT: real patches, no generation.

Stage I, localise: noise a real image at a few timesteps t (seeded) and predict the noise with the true label
and with the null label. Per position, relevance = mean over t of (error without label - error with label): how
much knowing the class helps to explain that part of the image. Candidate crops are the windows with the highest
mean relevance (at most `candidates` per image, on a quarter-crop grid).
Stage II, diversify: per class, embed the candidates (the reference model's penultimate features, or pixels),
k-means with k = IPC, and from each cluster keep the candidate with the highest relevance, resized to the
classifiers' input size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lgd_ray.batching import BatchSize
from lgd_ray.data import to_uint8
from lgd_ray.guidance import classifier_input
from lgd_ray.kmeans import largest_first
from lgd_ray.prior import Prior
from lgd_ray.seeding import generator


@torch.no_grad()
def relevance_maps(prior: Prior, images: torch.Tensor, labels: torch.Tensor, timesteps: list[int],
                   gens: list[torch.Generator]) -> torch.Tensor:
    """(N, H, W) relevance at the images' resolution; images in [-1, 1] at the prior's resolution."""
    z = prior.encode(images.to(prior.device))
    maps = torch.zeros(len(z), *z.shape[-2:], device=z.device)
    for t in timesteps:
        noise = torch.cat([torch.randn((1, *z.shape[1:]), generator=g) for g in gens]).to(z)
        tt = torch.tensor(t)
        z_t = prior.scheduler.add_noise(z, noise, tt.expand(len(z)).to(z.device))
        err_c = (prior.eps(z_t, tt, labels.to(z.device), 1.0) - noise).pow(2).sum(1)
        err_u = (prior.eps_null(z_t, tt) - noise).pow(2).sum(1)
        maps += (err_u - err_c) / len(timesteps)
    return F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu()


def top_crops(maps: torch.Tensor, size: int, count: int) -> list[list[tuple[float, int, int]]]:
    """Per map, the `count` crops of `size` x `size` (on a quarter-crop grid) with the highest mean relevance:
    (relevance, top, left), best first."""
    stride = max(1, size // 4)
    pooled = F.avg_pool2d(maps[:, None], size, stride=stride)[:, 0]
    out = []
    for p in pooled:
        scores, idx = p.flatten().topk(min(count, p.numel()))
        out.append([(s.item(), (i // p.shape[1]).item() * stride, (i % p.shape[1]).item() * stride)
                    for s, i in zip(scores, idx)])
    return out


@dataclass
class Candidate:
    image: torch.Tensor  # uint8 (C, size, size), the crop resized to the classifiers' input
    relevance: float  # mean relevance of the crop
    source: int  # index of the real image
    box: tuple[int, int, int]  # (top, left, size) at the prior's resolution


def select(candidates: list[Candidate], features: torch.Tensor, k: int, seed: int) -> list[Candidate]:
    """k-means (k clusters) on the candidates' features; the highest-relevance candidate of each cluster,
    ordered by cluster size (largest first)."""
    if len(candidates) < k:
        raise ValueError(f"dds: {k} images per class need at least {k} candidates, got {len(candidates)}")
    labels, _, order = largest_first(features, k, seed)
    chosen = []
    for j in order:
        members = (labels == j).nonzero().squeeze(1).tolist()
        chosen.append(max(members, key=lambda m: (candidates[m].relevance, -m)))
    return [candidates[m] for m in chosen]


def crop(image: torch.Tensor, top: int, left: int, size: int, out_size: int) -> torch.Tensor:
    """A square crop of a float image (C, H, W) in [-1, 1], resized to out_size."""
    return classifier_input(image[None, :, top:top + size, left:left + size], out_size)[0]


def relevance_batch_size(size: int) -> BatchSize:
    """Real images per batch of the relevance pass (dds.batch_size), halved on out-of-memory."""
    return BatchSize(size, "dds", "images per relevance batch", "dds.batch_size",
                     "dds: out of GPU memory with one image per relevance batch: set prior.dtype=bfloat16, or give "
                     "each actor more GPU (ray.num_gpus_per_actor)")


def class_candidates(prior: Prior, images: torch.Tensor, cls: int, indices: list[int], run_seed: int,
                     timesteps: list[int], crop_size: int, per_image: int, batch_size: int | BatchSize,
                     out_size: int) -> list[Candidate]:
    """Stage I for one class: candidates (crops of crop_size px) of every real image (float, [-1, 1], at the prior's
    resolution); the relevance pass in batches of `batch_size` (a BatchSize: halved on out-of-memory)."""
    sizes = batch_size if isinstance(batch_size, BatchSize) else relevance_batch_size(batch_size)

    def candidates(i: int, k: int) -> list[Candidate]:
        x, idx, out = images[i:k], indices[i:k], []
        gens = [generator(run_seed, "dds", cls, j) for j in idx]  # per image: the same noise in any batch
        maps = relevance_maps(prior, x, torch.full((len(x),), cls), timesteps, gens)
        for img, j, crops in zip(x, idx, top_crops(maps, crop_size, per_image)):
            for relevance, top, left in crops:
                out.append(Candidate(to_uint8(crop(img.cpu(), top, left, crop_size, out_size)), relevance, j,
                                     (top, left, crop_size)))
        return out

    return [c for part in sizes.run(len(images), candidates, prior.device) for c in part]
