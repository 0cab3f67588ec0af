"""`make gpu-check`: what only a GPU can show, in one command (at most ~10 minutes on one GPU, nothing downloaded).

    python bench/gpu_check.py [--out bench/results-gpu.json]    # full shape: DiT-XL/2 + SD-VAE + 2 ConvNet-6
    python bench/gpu_check.py --small                           # CPU-sized shapes (what the tests run)

Random weights (lgd_ray.prior.random_pipeline): timings and memory depend on shapes, not weights. Per variant (float32
with TF32, bfloat16, float32 with guidance.checkpointing, float32 with deviation guidance gamma > 0) and batch: an
unguided step (the CFG pair, no grad) and a guided step (denoiser path: the pair, the VAE decoder at 256 px and the two
classifiers at 128 px, forward and backward to x_t), timed after a warm-up; the allocator's peak during the guided step
(on the CPU: the weights plus the step's saved tensors) against lgd_ray.gpu_memory's estimate, what `distill --dry-run`
prints (within 15 %; 10 % on the CPU); every output finite; at the largest batch, the seconds of each part of the
guided step (DiT pair, VAE decoder, classifiers; forward and backward). The levers of the guided step, each beside
the plain step (`levers`): the batched deviation backward, channels_last, cudnn.benchmark and torch.compile (these two
on a GPU only). Then a forced out-of-memory (the decoder refusing more than
2 images) whose halved result equals a run at batch 2, and, with Ray and a GPU, a digits distillation through Ray with
GPU sampler actors and GPU Ray Train workers (NCCL with two or more GPUs).
Writes the rows as JSON (--out) and a Markdown table beside it; exits 1 if any check misses.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# boto3 is left out: only the S3 run-folder lease imports it
NEEDED = ("torch", "diffusers", "safetensors", "yaml", "webdataset", "timm", "sklearn", "pyarrow")
missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
if missing:  # a bare GPU machine: say what to bring, install nothing
    sys.exit(f"gpu-check: missing Python packages: {', '.join(missing)} (pip install them, or bring their wheels: "
             "nothing is downloaded here)")

import torch  # noqa: E402

from lgd_ray.cli import unusable_gpu  # noqa: E402
from lgd_ray.config import load_config  # noqa: E402
from lgd_ray.cost import DIT_XL_2_256  # noqa: E402
from lgd_ray.guidance import Guide, Scorer  # noqa: E402
from lgd_ray.gpu_memory import GIB, actor_memory, deviation_images, guided_step_bytes  # noqa: E402
from lgd_ray.models import build_classifier  # noqa: E402
from lgd_ray.prior import Prior, random_pipeline  # noqa: E402
from lgd_ray.train import pick_device  # noqa: E402

SMALL = (dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1),
         dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], latent_channels=4,
              norm_num_groups=8))
# name -> (prior.dtype, extra config keys)
VARIANTS = {"float32": ("float32", []), "bfloat16": ("bfloat16", []),
            "float32+checkpointing": ("float32", ["guidance.checkpointing=true"]),
            "float32+gamma": ("float32", ["guidance.gamma=50"])}
ROOT = Path(__file__).resolve().parent.parent


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


def _interleaved(a, b, device, repeats: int) -> tuple[float, float]:
    """Median seconds of a() and of b(), called in turn `repeats` times each after one warm-up call of each (so a
    drift of the machine's speed hits both)."""
    a(), b()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((a, b), times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - start)
    return tuple(sorted(t)[len(t) // 2] for t in times)


def _setup(small: bool, dtype: str, folder: str, device):
    transformer, vae = SMALL if small else (DIT_XL_2_256["transformer"], DIT_XL_2_256["vae"])
    pipe = random_pipeline(transformer, vae)
    if small:  # the estimate reads the shapes from a saved folder, as the dry-run does for a local pipeline
        pipe.save_pretrained(folder)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    to = lambda m: torch.nn.Module.to(m, device, torch_dtype).requires_grad_(False)  # (diffusers' .to warns)
    prior = Prior(to(pipe.transformer), pipe.scheduler, to(pipe.vae))
    prior.scheduler.set_timesteps(50)
    return prior


def _config(small: bool, dtype: str, extra: list[str], folder: str, batch: int):
    model_id = folder if small else "facebook/DiT-XL-2-256"  # the built-in DiT-XL/2 shapes: nothing is downloaded
    size = 32 if small else 128
    models = ["student.model=convnet3", "reference.model=convnet3"] if small else [
        "student.model=convnet6", "reference.model=convnet6"]
    return load_config("imagenet1k", [f"prior.model_id={model_id}", f"prior.dtype={dtype}", f"data.image_size={size}",
                                      f"guidance.batch={batch}", f"distill.sample_batch={batch}", "guidance.gamma=0",
                                      *models, *extra])


def check(small: bool, variant: str, batches: list[int], repeats: int, folder: str) -> list[dict]:
    """Rows of one variant: speed, peak memory against the estimate, finiteness."""
    device = pick_device("auto")
    dtype, extra = VARIANTS[variant]
    prior = _setup(small, dtype, folder, device)
    if "guidance.checkpointing=true" in extra:
        prior.checkpoint_blocks()
    t = prior.scheduler.timesteps[25]
    tolerance = 0.15 if device.type == "cuda" else 0.10
    rows = []
    for b in batches:
        cfg = _config(small, dtype, extra, folder, b)
        mem = actor_memory(cfg)
        nets = [build_classifier(cfg.student.model, 3, cfg.data.image_size, 1000, seed=s).to(device).eval()
                .requires_grad_(False) for s in (1, 2)]
        k = deviation_images(cfg)
        memory = {c: torch.randn(k, *prior.latent_shape, device=device) for c in range(b)} if k else None
        guide = Guide.from_config(cfg, Scorer(*nets, omega=cfg.guidance.omega), memory, batch=0)
        x, labels = torch.randn(b, *prior.latent_shape, device=device), torch.arange(b, device=device)
        row = {"variant": variant, "batch": b, "device": str(device), "estimate_peak_gib": round(mem.peak(b) / GIB, 3)}
        try:
            with torch.no_grad():
                unguided = _timed(lambda: prior.eps(x, t, labels, 4.0), device, repeats)
            guided = _timed(lambda: guide.eps(prior, x, t, labels.tolist(), 4.0), device, repeats)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                out = guide.eps(prior, x, t, labels.tolist(), 4.0)
                _sync(device)
                measured = torch.cuda.max_memory_allocated()
            else:
                out = guide.eps(prior, x, t, labels.tolist(), 4.0)
                measured = mem.weights + mem.deviation_held + guided_step_bytes(cfg, prior, *nets, b, k)
            row.update(measured_peak_gib=round(measured / GIB, 3), unguided_images_per_s=round(b / unguided, 2),
                       guided_images_per_s=round(b / guided, 2), guided_over_unguided=round(guided / unguided, 2),
                       finite=bool(torch.isfinite(out).all()), guide_batch_used=guide.batch.size or b)
            if b == max(batches):  # where the guided step's time goes, at the largest batch only (the time budget)
                row.update(part_seconds(prior, nets, x, t, labels, cfg.data.image_size, device, repeats, guided))
            row["ok"] = (row["finite"] and abs(measured - mem.peak(b)) <= tolerance * measured
                         and row["guide_batch_used"] == b)  # a step that halved inside is not the asked batch
        except torch.OutOfMemoryError:
            row.update(measured_peak_gib="OOM", ok=mem.peak(b) > 0.9 * torch.cuda.get_device_properties(0).total_memory)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_seconds(prior, nets, x, t, labels, size: int, device, repeats: int, guided: float) -> dict:
    """Median seconds of each part of a guided step, forward and backward to its input: the DiT's CFG pair, the VAE
    decoder, the two classifiers (at their input size); and the share of the guided step they add up to (the rest:
    the scheduler's arithmetic, the resize, the second backward of deviation guidance in the gamma variant)."""
    def grad_of(fn, like):
        wrt = like.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(fn(wrt).float().sum(), wrt)

    z = prior.x0(x, t, prior.eps(x, t, labels, 4.0)).detach()
    images = torch.randn(len(x), 3, size, size, device=device)
    parts = {"dit_pair_s": lambda: grad_of(lambda w: prior.eps(w, t, labels, 4.0), x),
             "vae_decoder_s": lambda: grad_of(prior.decode, z),
             "classifiers_s": lambda: grad_of(lambda w: sum(net(w).logsumexp(1) for net in nets), images)}
    out = {name: round(_timed(fn, device, repeats), 4) for name, fn in parts.items()}
    out["parts_share_of_guided"] = round(sum(out.values()) / guided, 3)
    return out


def levers(small: bool, folder: str, batch: int, repeats: int, compile_: bool) -> list[dict]:
    """The exact and the inexact levers of the guided step (float32, deviation guidance on), each timed against the
    plain step in one run: deviation guidance's two gradients through the DiT pair as one batched backward (what
    lgd_ray.guidance does) against two backwards; channels_last convolutions (VAE decoder, classifiers); cuDNN's
    autotuner (CUDA only); torch.compile of the DiT, the decoder and the classifiers (its compile seconds too). Each
    row: seconds of the lever and of the plain step, their ratio, the largest difference of the output. The first
    call's seconds (first_call_s) include torch.compile's compile time."""
    device = pick_device("auto")
    prior = _setup(small, "float32", folder, device)
    cfg = _config(small, "float32", ["guidance.gamma=50"], folder, batch)
    nets = [build_classifier(cfg.student.model, 3, cfg.data.image_size, 1000, seed=s).to(device).eval()
            .requires_grad_(False) for s in (1, 2)]
    t = prior.scheduler.timesteps[25]
    x, labels = torch.randn(batch, *prior.latent_shape, device=device), torch.arange(batch, device=device)
    memory = {c: torch.randn(2, *prior.latent_shape, device=device) for c in range(batch)}

    def step(p=prior, n=nets, deviation=memory):
        return lambda: Guide.from_config(cfg, Scorer(*n, omega=cfg.guidance.omega), deviation, batch=0).eps(
            p, x, t, labels.tolist(), 4.0)

    def pair_backward(batched: bool):
        def run():
            wrt = x.detach().requires_grad_(True)
            with torch.enable_grad():
                x0 = prior.x0(wrt, t, prior.eps(wrt, t, labels, 4.0))
                a, b = torch.randn_like(x0), torch.randn_like(x0)
                if batched:
                    return torch.autograd.grad(x0, wrt, torch.stack([a, b]), is_grads_batched=True)[0]
                return torch.stack([torch.autograd.grad(x0, wrt, a, retain_graph=True)[0],
                                    torch.autograd.grad(x0, wrt, b)[0]])
        return run

    def row(lever: str, fn, plain_fn, **extra) -> dict:
        r = {"check": f"lever: {lever}", "batch": batch, "device": str(device), **extra}
        try:
            first = time.perf_counter()
            out = fn()
            r["first_call_s"] = round(time.perf_counter() - first, 2)
            plain, lever_s = _interleaved(plain_fn, fn, device, repeats)
            r.update(plain_s=round(plain, 4), lever_s=round(lever_s, 4), lever_over_plain=round(lever_s / plain, 3))
            torch.manual_seed(0)
            want = plain_fn()
            torch.manual_seed(0)
            r.update(max_abs_diff=float((fn() - want).abs().max()), finite=bool(torch.isfinite(out).all()))
            r["ok"] = r["finite"] and (r["max_abs_diff"] == 0 or not extra.get("exact"))
        except Exception as e:  # a lever that fails on this machine is a finding, not a crash of the check
            r.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        print(json.dumps(r), flush=True)
        return r

    # exact: the same numbers on the CPU (tests/test_sampler.py); on a GPU the row says whether they are there too
    rows = [row("deviation backward batched", pair_backward(True), pair_backward(False), exact=device.type == "cpu")]
    last = lambda m: torch.nn.Module.to(m, memory_format=torch.channels_last)
    cl_prior = Prior(prior.transformer, prior.scheduler, last(_setup(small, "float32", folder, device).vae))
    cl_prior.vae.load_state_dict(prior.vae.state_dict())
    cl_nets = [last(build_classifier(cfg.student.model, 3, cfg.data.image_size, 1000, seed=s).to(device).eval()
                    .requires_grad_(False)) for s in (1, 2)]
    rows.append(row("channels_last", step(cl_prior, cl_nets), step()))
    if device.type == "cuda":
        def tuned():
            torch.backends.cudnn.benchmark = True
            try:
                return step()()
            finally:
                torch.backends.cudnn.benchmark = False
        rows.append(row("cudnn.benchmark", tuned, step()))
    if compile_:
        torch._dynamo.reset()
        fresh = _setup(small, "float32", folder, device)
        fresh.transformer.load_state_dict(prior.transformer.state_dict())
        fresh.vae.load_state_dict(prior.vae.state_dict())
        fresh.transformer, fresh.vae.decoder = torch.compile(fresh.transformer), torch.compile(fresh.vae.decoder)
        # without deviation guidance: a compiled model's backward does not run under the batched backward's vmap
        # (torch 2.14 on the CPU: "Cannot access data pointer of Tensor that doesn't have storage")
        rows.append(row("torch.compile (gamma 0)", step(fresh, [torch.compile(n) for n in nets], {}),
                        step(deviation={})))
    return rows


def forced_oom(small: bool, folder: str) -> dict:
    """The decoder refuses more than 2 images (as an allocator at its limit would): the guided step halves 8 -> 4 -> 2
    and equals a run at batch 2."""
    device = pick_device("auto")
    prior = _setup(small, "float32", folder, device)
    cfg = _config(small, "float32", [], folder, 8)
    nets = [build_classifier(cfg.student.model, 3, cfg.data.image_size, 1000, seed=s).to(device).eval()
            .requires_grad_(False) for s in (1, 2)]
    x, labels = torch.randn(8, *prior.latent_shape, device=device), torch.arange(8, device=device)
    t = prior.scheduler.timesteps[25]
    small_run = Guide.from_config(cfg, Scorer(*nets, omega=1.0), batch=2).eps(prior, x, t, labels.tolist(), 4.0)
    decode = prior.decode

    def capped(z):
        if torch.is_grad_enabled() and len(z) > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory (gpu-check cap 2, asked {len(z)})")
        return decode(z)

    prior.decode = capped
    guide = Guide.from_config(cfg, Scorer(*nets, omega=1.0), batch=8)
    halved = guide.eps(prior, x, t, labels.tolist(), 4.0)
    diff = float((halved - small_run).abs().max())
    row = {"check": "forced out-of-memory", "batch_after": guide.batch.size, "max_abs_diff": diff,
           "ok": guide.batch.size == 2 and diff < 1e-3}
    print(json.dumps(row), flush=True)
    return row


def distill_on_ray(out: Path, timeout: int) -> dict:
    """A digits distillation through Ray, GPU sampler actors and GPU Ray Train workers (all of the machine's GPUs)."""
    if importlib.util.find_spec("ray") is None:
        return {"check": "digits on Ray with GPUs", "ok": False, "why": "ray is not installed (bring its wheel)"}
    gpus = torch.cuda.device_count()
    if not gpus:
        return {"check": "digits on Ray with GPUs", "ok": None, "why": "no GPU: not run"}
    args = [sys.executable, "-m", "lgd_ray.distill", "digits", f"out={out}", f"cache={out}-cache", "distill.stages=1",
            "prior.train_steps=300", "ray.actors=auto", "ray.train_workers=auto", "ray.num_gpus_per_actor=1",
            "ray.num_cpus_per_actor=1", "ray.train_use_gpu=true", "ray.train_gpus_per_worker=1", "device=cuda"]
    start, row = time.time(), {"check": "digits on Ray with GPUs", "gpus": gpus}
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        row.update(ok=False, why=f"over {timeout} s", error=err[-1500:])
        print(json.dumps(row), flush=True)
        return row
    row.update(ddp="nccl" if gpus > 1 else "none (1 worker)", seconds=round(time.time() - start), ok=r.returncode == 0,
               last_line=(r.stdout.strip().splitlines() or [""])[-1][:300])
    if r.returncode:
        row["error"] = r.stderr.strip()[-1500:]
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (one per kind of row)."""
    lines = []
    for kind in ("variant", "check"):
        mine = [r for r in rows if kind in r]
        if mine:
            keys = list(dict.fromkeys(k for r in mine for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in mine] + [""]
    return "\n".join(lines)


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-distill", action="store_true", help="leave out the digits distillation on Ray")
    parser.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                        help="time torch.compile of the guided step's models (auto: on a GPU only; its compile time "
                             "on the CPU would dominate the small check)")
    parser.add_argument("--distill-timeout", type=int, default=480, help="seconds the digits distillation may take")
    parser.add_argument("--out", default="", help="write the rows as JSON here, and a Markdown table beside it")
    args = parser.parse_args(argv)
    problem = unusable_gpu()
    if problem:
        sys.exit(f"gpu-check: {problem}")
    if torch.cuda.is_available():
        print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})",
              flush=True)
    batches = args.batches or ([1, 2, 4] if args.small else [1, 4, 8, 16])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants:
            rows += check(args.small, variant, batches, args.repeats, folder)
        compile_ = args.compile == "yes" or (args.compile == "auto" and torch.cuda.is_available())
        rows += levers(args.small, folder, max(batches), args.repeats, compile_)
        rows.append(forced_oom(args.small, folder))
        if not args.no_distill:
            rows.append(distill_on_ray(Path(folder) / "digits-gpu", args.distill_timeout))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
        Path(args.out).with_suffix(".md").write_text(table(rows))
    missed = [r for r in rows if r.get("ok") is False]
    print(f"gpu-check: {len(rows) - len(missed)} of {len(rows)} rows ok" + (f"; missed: {missed}" if missed else ""),
          flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r.get("ok") is False for r in main(sys.argv[1:])) else 0)
