"""The cost model of a run (what `distill --dry-run` prints): the work and FLOPs of every stage of the stage plan,
without loading any weights.

Per-step FLOPs are counted by torch's FlopCounterMode on the models built on the meta device (shapes only), so
they follow the configured architectures: the DiT (DiT-XL/2-256's known shape, or the config.json of a local folder or
another hub id), the VAE decoder, the student and reference classifiers.
FLOPs here are 2 x multiply-adds (DiT-XL/2's "118.6 Gflops" in the DiT paper are multiply-adds: 237 GFLOPs here).
Backward passes are counted too, not assumed: through a frozen model to its input (guidance) a backward costs about
one forward (attention score matmuls twice), a training step about three.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from lgd_ray.config import AUTO, Config
from lgd_ray.data import class_chunks, num_classes
from lgd_ray.guidance import guided_steps
from lgd_ray.methods import METHODS, stage_plan
from lgd_ray.models import build_classifier
from lgd_ray.plan import fit_workers
from lgd_ray.prior import DTYPES, project_configs
from lgd_ray.storage import Location
from lgd_ray.tiny_decoder import build_tiny

PEAK_TFLOPS = {"float32": 495.0, "bfloat16": 989.0, "float16": 989.0}  # H100 SXM dense: TF32, BF16, FP16
# Share of the peak the dry-run assumes (--utilisation), by the prior's dtype: the guided DiT-XL/2 step measured on an
# H200 (bench/gpu-runs/2026-11-30, batch 16) ran 60.4-60.6 images/s x 2,218.6 GFLOP = 134 TFLOP/s = 27 % of TF32's
# 495 (25 % with deviation guidance), bfloat16 85.9-100.6 images/s = 191-223 TFLOP/s = 19-23 % of 989.
UTILISATION = {"float32": 0.25, "bfloat16": 0.20, "float16": 0.20}
UTILISATION_SOURCE = "the guided step measured on an H200 (bench/gpu-runs/2026-11-30)"
# What a cluster run pays besides the FLOPs (seconds), each an assumption the dry-run names, or a measurement
NODE_START_S = 300.0  # a GPU node booting and pulling the image (assumed; clusters/ cloud VMs)
ACTOR_START_S = 60.0  # a sampler actor starting and loading the prior (DiT-XL/2 + VAE, 2.8 GB) from its node's copy
#                       (assumed); paid once per run: the actors live from stage to stage and run the student fits
# Deliberately slow rates for a deadline on work not yet timed (a stage's first chunk, the first evaluation repeat):
# about a tenth of what was measured, so only a hung process passes them (ray.chunk_timeout_floor_s is the least)
SLOW_GPU_FLOPS = 10e12  # the guided DiT-XL/2 step ran at 124-134 TFLOP/s on an H200 (bench/gpu-runs/2026-11-30)
SLOW_CPU_FLOPS_PER_THREAD = 2e9  # tiny digits chunks: 11-32 GFLOP/s a thread here (bench/chunk_rate.py)
TEST_IMAGES = {"imagenet1k": 50_000, "imagenette": 3_925, "imagewoof": 3_929, "fashion-mnist": 10_000, "digits": 450}

# facebook/DiT-XL-2-256's architecture (its transformer/ and vae/ config.json), so planning needs no network
DIT_XL_2_256 = {
    "transformer": {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
                    "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000},
    "vae": {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4},
}


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _pipeline_configs(cfg: Config) -> tuple[dict, dict | None, str]:
    """(transformer config, vae config or None, where they came from) without loading weights. A prior made by
    fine-tuning prior.base has the base's shape."""
    model_id = cfg.prior.model_id or cfg.prior.base
    if model_id == "facebook/DiT-XL-2-256":
        return DIT_XL_2_256["transformer"], DIT_XL_2_256["vae"], "DiT-XL/2-256 with its VAE"
    if not model_id:
        dit, vae = project_configs(cfg)
        return dit, vae, f"the project's {'latent' if vae else 'pixel'} DiT (prior.* keys)"
    if "://" in model_id:  # a store copy: read the two config.json objects, nothing else
        store = Location(model_id)
        vae_cfg = store / "vae" / "config.json"
        return (json.loads((store / "transformer" / "config.json").read_text()),
                json.loads(vae_cfg.read_text()) if vae_cfg.exists() else None, f"config.json of {model_id}")
    try:
        transformer = dict(DiTTransformer2DModel.load_config(model_id, subfolder="transformer"))
        vae = None
        folder = Path(model_id)
        has_vae = (folder / "vae").is_dir() if folder.is_dir() else True
        if has_vae:
            vae = dict(AutoencoderKL.load_config(model_id, subfolder="vae"))
        return transformer, vae, f"config.json of {model_id}"
    except (OSError, ValueError) as e:
        raise ValueError(f"dry-run: cannot read the configs of {model_id!r}: {str(e).splitlines()[0]}") from e


@dataclass
class StepCosts:
    """GFLOPs of the pieces of sampling and training, per image; `*_grad`: forward + backward to the input."""

    dit_forward: float  # one DiT forward (one of the CFG pair)
    dit_grad: float
    decoder: float  # VAE decoder forward (0 for a pixel DiT)
    decoder_grad: float
    student: float  # classifier forward at the classifiers' input size
    student_grad: float
    reference: float
    reference_grad: float
    student_train: float  # forward + backward of a training step (weight gradients)
    source: str
    guide_decoder: float = 0.0  # the guided step's decoder of x0^: the VAE's, or the tiny one (guidance.decoder)
    guide_decoder_grad: float = 0.0


def forward_backward_flops(model: torch.nn.Module, call, x: torch.Tensor) -> tuple[float, float]:
    """(forward, forward + backward to x with the weights frozen) GFLOPs of call(model, x)."""
    model.requires_grad_(False)
    fwd = _flops(lambda: call(model, x))
    x = x.detach().requires_grad_(True)
    return fwd / 1e9, _flops(lambda: call(model, x).sum().backward()) / 1e9


@dataclass
class MetaModels:
    """The run's models with shapes only (meta device): the DiT and VAE in the prior's dtype, the classifiers."""

    dit: torch.nn.Module
    vae: torch.nn.Module | None
    student: torch.nn.Module
    reference: torch.nn.Module
    source: str


def meta_models(cfg: Config) -> MetaModels:
    """Build every model the sampler actors hold on the meta device, from the configs alone (no weights read)."""
    t_cfg, v_cfg, source = _pipeline_configs(cfg)
    n, size, ch = num_classes(cfg.data), cfg.data.image_size, cfg.data.channels
    keep = lambda c, cls: {k: v for k, v in c.items() if k in inspect.signature(cls.__init__).parameters}
    dtype = DTYPES[cfg.prior.dtype]
    with torch.device("meta"):
        # torch's Module.to: diffusers' own warns about fp32 modules, which these configs do not have
        dit = torch.nn.Module.to(DiTTransformer2DModel(**keep(t_cfg, DiTTransformer2DModel)), dtype)
        dit.eval().requires_grad_(False)
        vae = None
        if v_cfg is not None:
            vae = torch.nn.Module.to(AutoencoderKL(**keep(v_cfg, AutoencoderKL)), dtype).eval().requires_grad_(False)
        student = build_classifier(cfg.student.model, ch, size, n).eval()
        reference = build_classifier(cfg.reference.model, ch, size, n).eval()
    return MetaModels(dit, vae, student, reference, source)


def step_costs(cfg: Config) -> StepCosts:
    """Per-image GFLOPs of every model the run uses, counted on the meta device (in float32)."""
    m = meta_models(replace(cfg, prior=replace(cfg.prior, dtype="float32")))  # FLOPs do not depend on the dtype
    with torch.device("meta"):
        s, c = m.dit.config.sample_size, m.dit.config.in_channels
        t, y = torch.tensor([500]), torch.tensor([0])
        dit_f = forward_backward_flops(m.dit, lambda m, x: m(x, timestep=t, class_labels=y).sample, torch.randn(1, c, s, s))
        dec_f = (0.0, 0.0)
        if m.vae is not None:
            dec_f = forward_backward_flops(m.vae, lambda m, z: m.decode(z).sample,
                                           torch.randn(1, m.vae.config.latent_channels, s, s))
        img = torch.randn(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        run = lambda m, x: m(x)
        stu_f, ref_f = forward_backward_flops(m.student, run, img), forward_backward_flops(m.reference, run, img)
        m.student.requires_grad_(True)
        train_f = _flops(lambda: m.student(img).sum().backward()) / 1e9
        guide_f = dec_f
        if m.vae is not None and cfg.guidance.decoder == "tiny":
            tiny = build_tiny(m.dit.config, m.vae.config, cfg.guidance.tiny_width)
            guide_f = forward_backward_flops(tiny, lambda m, z: m(z), torch.randn(1, c, s, s))
    return StepCosts(*dit_f, *dec_f, *stu_f, *ref_f, train_f, m.source, *guide_f)


def run_cost(cfg: Config) -> dict:
    """Work and FLOPs of every stage: images, candidate trajectories, guided and unguided denoiser steps, training."""
    costs = step_costs(cfg)
    n = num_classes(cfg.data)
    g, steps = cfg.guidance, cfg.prior.num_steps
    guided_at = guided_steps(tuple(g.window), g.every, steps)
    cfg_mult = 2 if cfg.prior.cfg_scale > 1 else 1
    plain = cfg_mult * costs.dit_forward
    score = costs.decoder + costs.student + costs.reference  # decode + S of a candidate (final, or its x0^ at selection)
    # a guided step: decoder and both classifiers forward and backward on x0^ (the classifiers once per view with
    # guidance.augment), and the CFG pair forward, with its backward too on the denoiser path
    head = costs.guide_decoder_grad + max(1, g.augment) * (costs.student_grad + costs.reference_grad)
    guided = (cfg_mult * costs.dit_grad if g.through == "denoiser" else plain) + head
    if g.checkpointing:  # the checkpointed blocks run their forward again in the backward
        guided += (cfg_mult * costs.dit_forward if g.through == "denoiser" else 0.0) + (
            costs.decoder if g.decoder == "full" else 0.0)  # the tiny decoder is not checkpointed
    # deviation guidance (gamma > 0), in stages with earlier images of the class to deviate from: g_D takes the
    # CFG pair's backward for a second cotangent (batched with g_S's: the same FLOPs) (on the denoiser path; on x0^ it is a similarity's only)
    deviation = 0.0
    if g.gamma > 0 and g.through == "denoiser":
        deviation = cfg_mult * (costs.dit_grad - costs.dit_forward + (costs.dit_forward if g.checkpointing else 0.0))
    stages, total_images = [], 0
    for st in stage_plan(cfg):
        images = n * st.ipc
        total_images += images
        trajectories = images * st.kappa if METHODS[st.method].needs_prior else 0
        # early rejection: all candidates run the first select_after steps (indices >= pause), the kept one the rest
        early = st.kappa > 1 and 0 < g.select_after < steps
        pause = steps - g.select_after if early else 0
        survivors = images if early else trajectories
        gradient = guided_at if st.gradient else []
        g_steps = trajectories * sum(i >= pause for i in gradient) + survivors * sum(i < pause for i in gradient)
        all_steps = trajectories * (steps - pause) + survivors * pause
        scored = trajectories + (survivors if early else 0)
        d_steps = g_steps if deviation and st.index > 0 else 0  # the seed stage has nothing to deviate from
        sample_f = ((all_steps - g_steps) * plain + g_steps * guided + d_steps * deviation + scored * score) * 1e9
        train_f = costs.student_train * 1e9 * total_images * cfg.student.train.epochs
        stages.append({"stage": st.index, "ipc": st.ipc, "images": images, "trajectories": trajectories,
                       "guided_steps": g_steps, "deviation_steps": d_steps, "unguided_steps": all_steps - g_steps,
                       "sample_flops": sample_f,
                       "train_images": total_images, "train_flops": train_f})
    tiny_fit = 0.0  # guidance.decoder tiny, fitted once: the trajectories' steps, then per image of each step the full
    # decoder's target and the tiny one's forward and backward (about 3 forwards with the weight gradients)
    if g.decoder == "tiny" and costs.decoder:
        tiny_fit = (g.tiny_trajectories * n * steps * plain
                    + g.tiny_steps * cfg.prior.batch_size * (costs.decoder + 3 * costs.guide_decoder)) * 1e9
    return {"classes": n, "chunks": len(class_chunks(n, cfg.distill.classes_per_chunk)), "stages": stages,
            "window_steps": len(guided_at), "costs": costs.__dict__, "guided_step_gflops": guided,
            "deviation_step_gflops": deviation, "unguided_step_gflops": plain, "tiny_fit_flops": tiny_fit,
            "total_flops": sum(s["sample_flops"] + s["train_flops"] for s in stages)}


def slow_seconds(flops: float, gpus: float, threads: int) -> float:
    """Seconds `flops` take at the deliberately slow rates above, on `gpus` GPUs (a share counts as one) or else on
    `threads` CPU threads: a bound on healthy work that no run has timed yet."""
    return flops / (SLOW_GPU_FLOPS if gpus > 0 else SLOW_CPU_FLOPS_PER_THREAD * max(1, threads))


def chunk_flops(cfg: Config) -> list[float]:
    """FLOPs of the largest chunk (classes_per_chunk classes) of each stage, by the dry-run's count; [] where the
    prior's configs cannot be read without loading it (a hub id other than DiT-XL/2-256 with no network)."""
    try:
        plan = run_cost(cfg)
    except ValueError:
        return []
    return [s["sample_flops"] / plan["classes"] * min(plan["classes"], cfg.distill.classes_per_chunk)
            for s in plan["stages"]]


def classifier_fit_flops(model: str, channels: int, image_size: int, classes: int, images: int, epochs: int,
                         test_images: int, tests: int) -> float:
    """FLOPs of training a classifier for `epochs` over `images` and testing it `tests` times on `test_images`."""
    with torch.device("meta"):
        m = build_classifier(model, channels, image_size, classes)
        x = torch.randn(1, channels, image_size, image_size)
        forward = _flops(lambda: m(x))
        train = _flops(lambda: m(x).sum().backward())
    return train * images * epochs + forward * test_images * tests


def gpu_hours(flops: float, tflops: float, utilisation: float) -> float:
    return flops / (tflops * 1e12 * utilisation) / 3600


def cluster_cost(cfg: Config, plan: dict, gpus: int, tflops: float, utilisation: float) -> dict:
    """Wall time and GPU-hours held and busy of the plan on `gpus` GPUs (one sampler actor per GPU, DDP student fits
    on fit_workers(...) of them, the per-stage test on the fit's GPUs).

    Held: every GPU from the nodes' start to the end; busy: sampling, fitting and testing at the rate `tflops` x
    `utilisation`. A stage samples in rounds of `gpus` chunks (the last round waits for its slowest chunk), then fits
    on the kept actors (DDP over fit_workers of them: no Ray Train start-up, no actor restart).
    """
    rate = tflops * 1e12 * utilisation
    sized = replace(cfg, ray=replace(cfg.ray, train_workers=gpus))
    student_f = plan["costs"]["student"] * 1e9
    test_images = TEST_IMAGES.get(cfg.data.name) or TEST_IMAGES.get(cfg.name, 0)  # imagenet1k: a folder data set
    wall = NODE_START_S + ACTOR_START_S
    busy, stages = 0.0, []
    for s in plan["stages"]:
        chunk_s = s["sample_flops"] / plan["chunks"] / rate
        sample_s = -(-plan["chunks"] // gpus) * chunk_s
        workers = fit_workers(sized, s["train_images"])
        work_s = (s["train_flops"] + test_images * student_f) / rate
        fit_s = work_s / workers
        wall += sample_s + fit_s
        busy += s["sample_flops"] / rate + work_s
        stages.append({"stage": s["stage"], "sample_s": sample_s, "fit_workers": workers, "fit_s": fit_s})
    return {"gpus": gpus, "wall_h": wall / 3600, "held_gpu_h": gpus * wall / 3600, "busy_gpu_h": busy / 3600,
            "stages": stages, "test_images": test_images}


def format_cluster_cost(cfg: Config, plan: dict, cost: dict, tflops: float, utilisation: float, measured: bool) -> str:
    lines = [f"on {cost['gpus']} GPUs (one sampler actor each), at {tflops:.0f} TFLOPS x {utilisation:.0%} "
             + (f"({UTILISATION_SOURCE})" if measured else "(--utilisation)") + ":",
             "stage  sample h  fit workers  fit + test h"]
    lines += [f"{s['stage']:>5}  {s['sample_s'] / 3600:>8.2f}  {s['fit_workers']:>11}  {s['fit_s'] / 3600:>12.2f}"
              for s in cost["stages"]]
    lines += [f"wall {cost['wall_h']:.2f} h",
              f"held {cost['held_gpu_h']:.1f} GPU-h (every GPU from the nodes' start to the end)",
              f"busy {cost['busy_gpu_h']:.1f} GPU-h (sampling, student fits, the test of "
              f"{cost['test_images'] or 'an unknown number of'} images a stage): held / busy "
              f"{cost['held_gpu_h'] / cost['busy_gpu_h']:.2f}x",
              "other cluster sizes: " + "; ".join(
                  f"{g} GPUs {c['wall_h']:.2f} h, held {c['held_gpu_h']:.1f} GPU-h ({c['held_gpu_h'] / c['busy_gpu_h']:.2f}x busy)"
                  for g in (8, 16, 32, 64, 128) if g != cost["gpus"]
                  for c in [cluster_cost(cfg, plan, g, tflops, utilisation)]),
              f"assumed: nodes up {NODE_START_S:.0f} s after the request, an actor's start and prior load "
              f"{ACTOR_START_S:.0f} s (once: the actors live through the run and run the student fits), DDP fits "
              "scaling linearly; reference training not included"]
    return "\n".join(lines)


def cluster_gpus_of(yaml_path: str, accelerator_type: str = "") -> int:
    """GPUs a Ray cluster file can scale to: each worker node type's max_workers x its GPUs (of the accelerator
    type, if set)."""
    import yaml

    with open(yaml_path) as f:
        types = (yaml.safe_load(f) or {}).get("available_node_types") or {}
    return int(sum(t.get("max_workers", 0) * (t.get("resources") or {}).get("GPU", 0) for t in types.values()
                   if not accelerator_type or f"accelerator_type:{accelerator_type}" in (t.get("resources") or {})))


def stage_cost(cfg: Config, planned: dict, rows: list[dict]) -> dict:
    """A stage's cost for the manifest: its planned work, the sampler seconds its chunks took (actor-seconds, summed
    over chunks; on this run's hardware) and the GPU-hours the dry-run's rate gives the same work on an H100."""
    actor_seconds = sum(r.get("seconds", 0.0) for r in rows)
    images = sum(r["count"] for r in rows)
    tflops, utilisation = PEAK_TFLOPS[cfg.prior.dtype], UTILISATION[cfg.prior.dtype]
    return {"trajectories": planned["trajectories"], "guided_steps": planned["guided_steps"],
            "unguided_steps": planned["unguided_steps"], "actor_seconds": round(actor_seconds, 2),
            "images_per_actor_second": round(images / actor_seconds, 3) if actor_seconds else None,
            "h100_gpu_hours": float(f"{gpu_hours(planned['sample_flops'] + planned['train_flops'], tflops, utilisation):.4g}"),
            "h100_basis": f"{tflops:.0f} TFLOPS x {utilisation:.0%} (dry-run estimate from {UTILISATION_SOURCE})"}


def format_cost(cfg: Config, plan: dict, tflops: float, utilisation: float) -> str:
    """The plan as text, with GPU-hours at `tflops` peak and `utilisation`."""
    c, r = plan["costs"], cfg.ray
    train_on = ("GPU if the cluster has one" if r.train_use_gpu is AUTO else
                f"GPU {r.train_gpus_per_worker}" if r.train_use_gpu else "CPU")
    lines = [f"plan: {cfg.name}, method {cfg.distill.method}, {plan['classes']} classes in {plan['chunks']} chunks "
             f"of <= {cfg.distill.classes_per_chunk}; {r.actors or 'auto (one per GPU)'} sampler actors x "
             f"({r.num_cpus_per_actor} CPU, {'auto' if r.num_gpus_per_actor is AUTO else r.num_gpus_per_actor} GPU); "
             f"student fits on {r.train_workers or 'auto (one per GPU)'} Ray Train worker(s) ({train_on})",
             f"per image GFLOPs ({c['source']}), forward / with backward to the input: DiT {c['dit_forward']:.1f} / "
             f"{c['dit_grad']:.1f}, VAE decoder {c['decoder']:.1f} / {c['decoder_grad']:.1f}, student {c['student']:.2f} / "
             f"{c['student_grad']:.2f}, reference {c['reference']:.2f} / {c['reference_grad']:.2f}; "
             f"a student training step {c['student_train']:.2f}",
             f"per trajectory step: unguided {plan['unguided_step_gflops']:.1f} GFLOPs (CFG x{2 if cfg.prior.cfg_scale > 1 else 1}), "
             f"guided ({cfg.guidance.through}) {plan['guided_step_gflops']:.1f} GFLOPs"
             + (f" with the tiny guidance decoder ({c['guide_decoder']:.1f} / {c['guide_decoder_grad']:.1f} GFLOPs; its "
                f"one-off fit {plan['tiny_fit_flops'] / 1e15:.1f} PFLOPs = "
                f"{gpu_hours(plan['tiny_fit_flops'], tflops, utilisation):.2f} GPU-h)" if plan["tiny_fit_flops"] else "")
             + (f", + {plan['deviation_step_gflops']:.1f} for deviation guidance (gamma {cfg.guidance.gamma:g}: the DiT's "
                "backward for a second gradient, stages 1 on)" if plan["deviation_step_gflops"] else "")
             + f"; {plan['window_steps']} guided of "
             f"{cfg.prior.num_steps} steps (window {cfg.guidance.window}, every {cfg.guidance.every}); "
             + (f"candidates cut to the best after {cfg.guidance.select_after} steps"
                if 0 < cfg.guidance.select_after < cfg.prior.num_steps else "all candidates run to the end"), "",
             "stage  IPC   images  trajectories  guided steps  unguided steps  sample PFLOPs  train PFLOPs  GPU-h"]
    for s in plan["stages"]:
        hours = gpu_hours(s["sample_flops"] + s["train_flops"], tflops, utilisation)
        lines.append(f"{s['stage']:>5}  {s['ipc']:>3}  {s['images']:>7}  {s['trajectories']:>12}  {s['guided_steps']:>12}  "
                     f"{s['unguided_steps']:>14}  {s['sample_flops'] / 1e15:>13.1f}  {s['train_flops'] / 1e15:>12.1f}  {hours:>5.1f}")
    total_h = gpu_hours(plan["total_flops"], tflops, utilisation)
    lines += ["", f"total: {plan['total_flops'] / 1e15:.1f} PFLOPs = {total_h:.1f} GPU-hours at {tflops:.0f} TFLOPS peak x "
              f"{utilisation:.0%} utilisation (reference training and evaluation not included); busy GPU-hours "
              "only: what a cluster holds is below (--gpus N or --cluster YAML)"]
    return "\n".join(lines)
