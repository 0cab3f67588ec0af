"""The guided step at DiT-XL/2-256 shape without Ray: peak memory against the dry-run's estimate, trajectory-steps
per second, the guided/unguided cost ratio, in float32 (TF32 on a GPU) and bfloat16.

    python bench/gpu_check.py [--batches 1 4 16] [--repeats 3]     # full shape: DiT-XL/2 + SD-VAE + 2 ConvNet-6
    python bench/gpu_check.py --small                               # CPU-sized shapes (what the tests run)

Random weights (lgd_ray.prior.random_pipeline): timings and memory depend on shapes, not weights; nothing is
downloaded. Per dtype and batch: an unguided step (the CFG pair, no grad) and a guided step (denoiser path: the
pair, the VAE decoder at 256 px and the two classifiers at 128 px, forward and backward to x_t), timed after a warm-up.
Memory: on CUDA the allocator's peak during the guided step (torch.cuda.max_memory_allocated); on the CPU the weights
plus the saved tensors of the step (no allocator statistics there). Estimate: lgd_ray.memory for the same config,
what `distill --dry-run` prints.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lgd_ray.config import load_config
from lgd_ray.guidance import Guide, Scorer
from lgd_ray.memory import GIB, actor_memory, guided_step_bytes
from lgd_ray.models import build_classifier
from lgd_ray.cost import DIT_XL_2_256
from lgd_ray.prior import Prior, random_pipeline
from lgd_ray.train import pick_device

SMALL = (dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1),
         dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], latent_channels=4,
              norm_num_groups=8))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check(small: bool, dtype: str, batches: list[int], repeats: int, folder: str = "") -> list[dict]:
    device = pick_device("auto")
    transformer, vae = SMALL if small else (DIT_XL_2_256["transformer"], DIT_XL_2_256["vae"])
    pipe = random_pipeline(transformer, vae)
    if small:  # the estimate reads the shapes from a saved folder, as the dry-run does for a local pipeline
        pipe.save_pretrained(folder)
    model_id = folder if small else "facebook/DiT-XL-2-256"  # the built-in DiT-XL/2 shapes: nothing is downloaded
    size = 32 if small else 128
    models = [] if small else ["student.model=convnet6", "reference.model=convnet6"]
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    to = lambda m: torch.nn.Module.to(m, device, torch_dtype).requires_grad_(False)  # (diffusers' .to warns)
    prior = Prior(to(pipe.transformer), pipe.scheduler, to(pipe.vae))
    prior.scheduler.set_timesteps(50)
    t = prior.scheduler.timesteps[25]
    rows = []
    for b in batches:
        cfg = load_config("imagenet1k", [f"prior.model_id={model_id}", f"prior.dtype={dtype}", f"data.image_size={size}",
                                         f"guidance.batch={b}", f"distill.sample_batch={b}", "student.model=convnet3",
                                         "reference.model=convnet3"] + models)
        mem = actor_memory(cfg)
        nets = [build_classifier(cfg.student.model, 3, size, 1000, seed=s).to(device).eval().requires_grad_(False)
                for s in (1, 2)]
        guide = Guide.from_config(cfg, Scorer(*nets, omega=cfg.guidance.omega), batch=0)
        x, labels = torch.randn(b, *prior.latent_shape, device=device), torch.arange(b, device=device)
        row = {"dtype": dtype, "batch": b, "device": str(device),
               "estimate_peak_gib": round(mem.peak(b) / GIB, 3)}
        try:
            with torch.no_grad():
                unguided = _timed(lambda: prior.eps(x, t, labels, 4.0), device, repeats)
            guided = _timed(lambda: guide.eps(prior, x, t, labels, 4.0), device, repeats)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                guide.eps(prior, x, t, labels, 4.0)
                _sync(device)
                measured = torch.cuda.max_memory_allocated()
            else:
                measured = mem.weights + guided_step_bytes(cfg, prior, *nets, b)
            row.update(measured_peak_gib=round(measured / GIB, 3), unguided_steps_per_s=round(b / unguided, 2),
                       guided_steps_per_s=round(b / guided, 2), guided_over_unguided=round(guided / unguided, 2))
        except torch.OutOfMemoryError:
            row.update(measured_peak_gib="OOM")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    batches = args.batches or ([1, 2, 4] if args.small else [1, 4, 8, 16, 24])
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in args.dtypes:
            rows += check(args.small, dtype, batches, args.repeats, folder)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
