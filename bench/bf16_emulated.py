"""Run a CLI (distill, evaluate, bench) with bfloat16 matrix products done the way a GPU's tensor cores do them,
on a CPU without bfloat16 units.

    python bench/bf16_emulated.py check
    python bench/bf16_emulated.py lgd_ray.distill fashion-mnist prior.dtype=bfloat16 ray.enabled=false out=...

A tensor-core bf16 GEMM multiplies bf16 inputs exactly, accumulates in float32 and rounds the result to bf16 once.
On an AVX2 CPU torch runs bf16 GEMMs about 20x slower than float32 ones (measured: a Fashion-MNIST DiT forward +
backward at batch 64 spends 94 % of its time in bf16 mm/addmm). Here every mm / addmm / bmm / baddbmm whose inputs
are all bf16 is computed in float32 from those bf16 values and rounded to bf16: the GPU's numerics up to the order
of the float32 sums, at float32 speed. Everything else (attention, norms, activations, convolutions) runs natively in
bf16. Only in-process runs are covered (ray.enabled=false): Ray workers do not inherit the mode.
`check` measures the emulation against torch's own bf16 kernels on one DiT forward + backward (measured: 1.0 %
from float32 like native bf16, 0.09 % from native bf16, at float32's seconds).
"""
import contextlib
import runpy
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


class TensorCoreBf16(TorchDispatchMode):
    """bf16 GEMMs as float32 products of the bf16 values, rounded to bf16 once; `count` of them done."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in GEMMS and tensors and all(a.dtype == torch.bfloat16 for a in tensors):
            TensorCoreBf16.count += 1
            up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*up, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def tiny_dit(size: int = 28, depth: int = 4):
    """A Fashion-MNIST-shaped DiT with random weights (ada_norm_zero starts at zero: every block made non-trivial)."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=2,
                                  num_layers=depth, sample_size=size, patch_size=4, num_embeds_ada_norm=10,
                                  norm_type="ada_norm_zero").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


def compare(model, batch: int = 64) -> dict[str, tuple[float, float, float]]:
    """One forward + backward to the input in float32, native bf16 and emulated bf16: per mode (relative error of
    the output, of the input gradient, seconds); errors against float32, and "emulated vs bf16" against native."""
    size = model.config.sample_size
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    t, y = torch.full((batch,), 500), torch.arange(batch) % 10

    def run(dtype, emulate=False):
        m = model.to(dtype)
        xi = x.to(dtype).detach().requires_grad_(True)
        start = time.perf_counter()
        with TensorCoreBf16() if emulate else contextlib.nullcontext():
            out = m(xi, timestep=t, class_labels=y).sample
            out.float().square().sum().backward()
        return out.detach().float(), xi.grad.float(), time.perf_counter() - start

    runs = {"float32": run(torch.float32), "bf16": run(torch.bfloat16), "emulated": run(torch.bfloat16, True)}
    model.to(torch.float32)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    ref, native = runs["float32"], runs["bf16"]
    out = {k: (rel(r[0], ref[0]), rel(r[1], ref[1]), r[2]) for k, r in runs.items()}
    out["emulated vs bf16"] = (rel(runs["emulated"][0], native[0]), rel(runs["emulated"][1], native[1]), 0.0)
    return out


def check():
    """The Fashion-MNIST DiT at batch 64: how far each mode is from float32 and emulated from native, and seconds."""
    print(f"{'':18s} {'rel. err. out':>14s} {'rel. err. grad':>15s} {'seconds':>8s}")
    for name, (e_out, e_grad, sec) in compare(tiny_dit()).items():
        seconds = "" if name == "emulated vs bf16" else f"{sec:8.2f}"
        print(f"{name:18s} {e_out:14.5f} {e_grad:15.5f} {seconds}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "check":
        return check()
    module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
    with TensorCoreBf16():
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        finally:
            print(f"bf16_emulated: {TensorCoreBf16.count} bf16 GEMMs done in float32 and rounded to bf16", flush=True)


if __name__ == "__main__":
    main()
