"""Every random draw gets its own seed, derived from the numbers that name it (run seed, stage, class, slot ...)."""
import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on `parts`, e.g. derive_seed(run_seed, "noise", stage, cls, slot, cand)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded with derive_seed(*parts)."""
    return torch.Generator().manual_seed(derive_seed(*parts))
