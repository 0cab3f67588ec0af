"""Batches that halve on a GPU out-of-memory error. Every batched GPU step of a sampler actor (the guided backward,
unguided sampling, the final decode and scoring, early selection, DDS's relevance pass) runs through a `BatchSize`
kept for the actor's lifetime, so the first out-of-memory error costs one retry, not every later chunk.

Every step here treats the images of a batch independently, so a smaller batch gives the same images; what keeps state
across a retried batch (the trajectories' noise generators) is rewound first.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from lgd_ray.errors import ConfigError

T = TypeVar("T")


def free_cached_memory(device: torch.device | str):
    """Return the CUDA allocator's cached blocks (no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class BatchSize:
    """A batch size that halves on out-of-memory, down to one; out of memory at one is `at_one` (a ConfigError).
    Size 0: every item in one batch (until the first out-of-memory error).

    what, unit, key: who says it, what is batched, the config key that sets the size (for the line said on halving).
    """

    def __init__(self, size: int, what: str, unit: str, key: str, at_one: str):
        self.size, self.what, self.unit, self.key, self.at_one = max(0, size), what, unit, key, at_one

    def run(self, n: int, fn: Callable[[int, int], T], device, rewind: Callable[[int, int], None] | None = None) -> list[T]:
        """[fn(i, j) for the consecutive batches [i, j) of range(n)]. A batch that runs out of GPU memory is run again
        at half the size (after rewind(i, j), if given; the allocator's cache emptied first), the size kept for the rest
        of this call and every later one."""
        out, i = [], 0
        while i < n:
            j = min(i + (self.size or n), n)
            failed = False
            try:
                out.append(fn(i, j))
                i = j
            except torch.OutOfMemoryError:
                if j - i == 1:
                    raise ConfigError(self.at_one) from None
                failed = True
            if failed:  # outside the except block: its traceback no longer holds the failed try's tensors
                free_cached_memory(device)
                self.size = (j - i) // 2
                print(f"{self.what}: out of memory at {j - i} {self.unit}; now {self.size} (set {self.key} to start "
                      "there)", flush=True)
                if rewind is not None:
                    rewind(i, j)
        return out
