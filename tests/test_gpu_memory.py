"""The sampler actor's memory, counted on the meta device for `distill --dry-run`: against a real guided step, and
the refusal of a config that cannot fit."""
from dataclasses import replace

import pytest
import torch

from conftest import load_bench
from lgd_ray.config import ConfigError, load_config
from lgd_ray.gpu_memory import GIB, actor_memory, check_fits, deviation_images, guided_step_bytes, saved_bytes
from lgd_ray.models import build_classifier
from lgd_ray.prior import load_prior


def test_the_count_sees_attention_and_a_retained_backward_as_cuda_runs_them():
    """On the meta device attention is counted as CUDA's memory-efficient kernel runs it (an H200 measured that
    kernel's saved bytes, bench/gpu-runs/2026-11-30): no attention matrix saved, unlike the math path. A backward that
    keeps its graph adds its own working set, which a freeing backward does not."""
    q = torch.randn(2, 4, 64, 16, device="meta", requires_grad=True)
    matrix = 2 * 4 * 64 * 64 * 4  # one float32 attention matrix
    fused = saved_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    math = saved_bytes(lambda: (q @ q.transpose(-1, -2) / 4).softmax(-1) @ q)
    assert 0 < fused < matrix < math  # the math path holds the matrix, the fused kernel its output and log-sum-exp
    x = torch.randn(8, 256, device="meta", requires_grad=True)

    def step(retain: bool):
        torch.autograd.grad((x.exp() * x).sum(), x, retain_graph=retain)

    assert saved_bytes(lambda: step(True)) > saved_bytes(lambda: step(False))


@pytest.mark.parametrize("through, gamma", [("denoiser", 0), ("decoder", 0), ("denoiser", 50)])
def test_meta_count_agrees_with_the_same_counter_on_a_cpu_guided_step(latent_pipeline_dir, through, gamma):
    """The estimate (meta device, batches 1 and 2, extrapolated) within 10 % of the saved tensors of a real guided
    step of 12 trajectories on the CPU (more than the 10 classes; a tiny latent DiT + VAE, ConvNet classifiers at 32 px), with deviation guidance
    too (gamma > 0: the graph kept for g_D's backward, against the last stage's 90 earlier latents a class). Both sides
    use the same saved-tensor counter: this checks the meta device's shapes and the extrapolation, and cannot catch
    what the counter misses (an under-count); bench/gpu_check.py measures torch's allocator on a GPU for that."""
    cfg = load_config("imagenette", [f"prior.model_id={latent_pipeline_dir}", "data.image_size=32", "student.model=convnet3",
                                     "reference.model=convnet3", f"guidance.through={through}", f"guidance.gamma={gamma}"])
    mem = actor_memory(cfg)
    k = deviation_images(cfg)
    assert k == (90 if gamma else 0) and (mem.deviation_held > 0) == (gamma > 0)
    prior = load_prior(str(latent_pipeline_dir))
    prior.scheduler.set_timesteps(cfg.prior.num_steps)
    torch.manual_seed(0)
    student, reference = (build_classifier(m, 3, 32, 10).eval().requires_grad_(False)
                          for m in (cfg.student.model, cfg.reference.model))
    measured = guided_step_bytes(cfg, prior, student, reference, 12, k)
    estimate = mem.guided_fixed + 12 * mem.guided_per_trajectory
    print(f"{through}: estimate {estimate} B, measured {measured} B")
    assert measured > 0 and abs(estimate - measured) / measured < 0.10, (estimate, measured)
    weights = sum(t.numel() * 4 for m in (prior.transformer, prior.vae, student, reference)
                  for t in (*m.parameters(), *m.buffers()))
    assert mem.weights == weights


def test_count_is_the_peak_of_live_saved_storages():
    """A storage saved by an op whose result is dropped counts only while it lives; the count does not depend on
    whether the allocator hands its address to the next storage (the cause of a flaky estimate before)."""
    from lgd_ray.gpu_memory import saved_bytes

    x = torch.randn(1000, requires_grad=True)

    def one_at_a_time():
        for _ in range(20):
            x.exp()  # exp saves its 4000-byte result, freed with the dropped graph

    def all_kept():
        return [x.exp() for _ in range(3)]

    assert saved_bytes(one_at_a_time) == 4000
    assert saved_bytes(all_kept) == 12000


def test_dit_xl_guided_step_is_counted_and_a_config_that_cannot_fit_is_refused():
    cfg = load_config("imagenet1k", ["ray.num_gpus_per_actor=0.5", "guidance.batch=0"])
    mem = actor_memory(cfg)
    assert 1.5 * GIB < mem.guided_per_trajectory < 3 * GIB  # DiT-XL/2 CFG pair + SD-VAE decoder at 256 px, float32
    assert 2.5 * GIB < mem.weights < 3.5 * GIB  # 675 M + 84 M parameters in float32
    with pytest.raises(ConfigError, match=r"guidance.batch 64 needs .* GiB per sampler actor .* set guidance.batch=(\d+)") as e:
        check_fits(cfg, mem)
    fits = int(e.value.args[0].rsplit("=", 1)[1])
    assert 1 <= fits < 64
    assert check_fits(replace(cfg, guidance=replace(cfg.guidance, batch=fits)), replace(mem, guidance_batch=fits))
    with pytest.raises(ConfigError, match="set guidance.batch"):
        check_fits(cfg, replace(mem, guidance_batch=fits + 1))
    bf16 = actor_memory(load_config("imagenet1k", ["prior.dtype=bfloat16"]))
    assert bf16.weights < 0.6 * mem.weights and bf16.guided_per_trajectory < mem.guided_per_trajectory
    assert check_fits(load_config("imagenet1k", ["ray.num_gpus_per_actor=0"])) is None  # CPU actors: not checked
    with pytest.raises(ConfigError, match="unknown; set ray.gpu_memory_gb"):
        check_fits(load_config("imagenet1k", ["ray.accelerator_type=TPU-V4", "guidance.batch=16"]), mem)
    with pytest.raises(ConfigError, match="lower distill.sample_batch"):
        check_fits(load_config("imagenet1k", ["ray.gpu_memory_gb=16", "guidance.batch=16"]), mem)


def test_guidance_batch_auto_is_the_largest_that_fits(capsys):
    """guidance.batch auto (the GPU configs' default): sized for the actor's GPU share to the largest guided backward
    the count fits, which check_fits then passes; one more would be refused; 0 (the whole batch) on the CPU."""
    from lgd_ray.gpu_memory import size_guidance_batch

    cfg = load_config("imagenet1k")
    assert cfg.guidance.batch is None  # auto, until sized
    assert check_fits(cfg) is None  # not checked before it is sized
    sizes = {}
    for gpus in (1.0, 0.5):
        sized = size_guidance_batch(replace(cfg, ray=replace(cfg.ray, num_gpus_per_actor=gpus)), gpus)
        n = sizes[gpus] = sized.guidance.batch
        mem = check_fits(sized)
        assert mem is not None and mem.guidance_batch == n
        if n < cfg.distill.sample_batch:
            with pytest.raises(ConfigError, match=f"set guidance.batch={n}"):
                check_fits(replace(sized, guidance=replace(sized.guidance, batch=n + 1)))
    assert 16 < sizes[1.0] <= 64 and 1 <= sizes[0.5] < sizes[1.0]
    assert f"guidance: batch auto -> {sizes[1.0]} (the largest guided backward that 1 x H100 80 GB" in capsys.readouterr().out
    assert size_guidance_batch(cfg, 0.0).guidance.batch == 0


def test_gpu_check_runs_at_small_shapes_on_the_cpu(tmp_path):
    """`make gpu-check`'s small path, as CI runs it: every variant's measured peak (weights + saved tensors of a real
    guided step) within 10 % of the estimate, outputs finite, the forced out-of-memory equal to a batch-2 run; the
    distillation on GPUs is not run without one (its speeds are printed, not checked: timings belong to benchmarks)."""
    bench = load_bench("gpu_check")
    rows = bench.main(["--small", "--batches", "1", "3", "--repeats", "1", "--out", str(tmp_path / "gpu.json")])
    steps = [r for r in rows if "variant" in r]
    assert [(r["variant"], r["batch"]) for r in steps] == [(v, b) for v in bench.VARIANTS for b in (1, 3)]
    for r in steps:
        assert r["ok"] and r["finite"] and abs(r["measured_peak_gib"] - r["estimate_peak_gib"]) <= 0.1 * r["measured_peak_gib"], r
    for r in steps:  # the parts of the guided step, timed at the largest batch
        parts = ("dit_pair_s", "vae_decoder_s", "classifiers_s", "parts_share_of_guided")
        assert all(r[k] > 0 for k in parts) if r["batch"] == 3 else not set(parts) & set(r), r
    checks = {r["check"]: r for r in rows if "check" in r}
    assert checks["forced out-of-memory"]["ok"] and checks["forced out-of-memory"]["batch_after"] == 2
    assert checks["digits on Ray with GPUs"]["ok"] is None  # no GPU here
    # the levers, timed beside the plain step: the batched deviation backward gives the very numbers on the CPU
    assert checks["lever: deviation backward batched"]["ok"] and checks["lever: deviation backward batched"]["max_abs_diff"] == 0
    assert checks["lever: channels_last"]["ok"] and checks["lever: channels_last"]["max_abs_diff"] < 1e-4
    assert "lever: torch.compile (gamma 0)" not in checks and "lever: cudnn.benchmark" not in checks  # GPU only
    assert (tmp_path / "gpu.md").read_text().startswith("| variant | batch |")


def test_checkpointing_gives_the_same_guidance_with_a_smaller_count(latent_pipeline_dir):
    """guidance.checkpointing: the guided noise prediction is unchanged (same arithmetic, recomputed), the count
    (saved tensors + the checkpointed blocks' inputs) is smaller, and the meta-device estimate still matches it."""
    from lgd_ray.guidance import Guide, Scorer

    over = [f"prior.model_id={latent_pipeline_dir}", "data.image_size=32", "student.model=convnet3",
            "reference.model=convnet3"]
    plain_cfg, ckpt_cfg = (load_config("imagenette", over + [f"guidance.checkpointing={c}"]) for c in ("false", "true"))
    torch.manual_seed(0)
    nets = [build_classifier("convnet3", 3, 32, 10).eval().requires_grad_(False) for _ in range(2)]
    x, labels = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    results = {}
    for name, cfg in (("plain", plain_cfg), ("ckpt", ckpt_cfg)):
        prior = load_prior(str(latent_pipeline_dir))
        prior.scheduler.set_timesteps(cfg.prior.num_steps)
        if cfg.guidance.checkpointing:
            prior.checkpoint_blocks()
        t = prior.scheduler.timesteps[5]
        guide = Guide.from_config(cfg, Scorer(*nets, omega=1.0), batch=0)
        eps = guide.eps(prior, x, t, labels.tolist(), 4.0)
        measured = guided_step_bytes(cfg, prior, *nets, 6, deviation_images(cfg))  # imagenette: gamma > 0
        mem = actor_memory(cfg)
        estimate = mem.guided_fixed + 6 * mem.guided_per_trajectory
        assert abs(estimate - measured) / measured < 0.10, (name, estimate, measured)
        results[name] = eps, measured
    assert torch.allclose(results["plain"][0], results["ckpt"][0], atol=1e-5)
    assert results["ckpt"][1] < results["plain"][1]
    print({k: v[1] for k, v in results.items()})


def test_a_prior_fit_that_cannot_fit_its_gpu_is_refused_and_the_keys_shrink_it():
    """DiT-XL/2 fine-tuned at 64 images per worker in float32 (weights, gradients, AdamW and EMA: 20 bytes a parameter,
    plus the activations): refused on a 40 GB GPU, naming the keys; activation checkpointing and bf16 autocast each
    shrink the activations; CPU workers are not checked."""
    from lgd_ray.gpu_memory import check_fit_fits, prior_fit_memory

    keys = ["data.name=folder", "data.root=/nowhere", "data.classes=imagenette", "prior.model_id=",
            "prior.base=facebook/DiT-XL-2-256", "prior.batch_size=64", "ray.train_use_gpu=true", "ray.train_workers=1"]
    cfg = load_config("folder", keys + ["ray.gpu_memory_gb=40"])
    plain = prior_fit_memory(cfg, 1)
    assert 12 * GIB < plain.state < 15 * GIB  # ~700 M parameters x 20 bytes
    assert plain.batch == 64 and plain.per_image > 0.2 * GIB  # 256 tokens x 1152 x 28 blocks of saved activations
    with pytest.raises(ConfigError, match=r"^config: the prior's fit needs [\d.]+ GiB per Ray Train worker .* it has "
                                          r"37.3 GiB \(1 x ray.gpu_memory_gb 40\): set prior.checkpointing=true or prior.autocast=bfloat16"):
        check_fit_fits(cfg, 1)
    ckpt = prior_fit_memory(load_config("folder", keys + ["prior.checkpointing=true"]), 1)
    bf16 = prior_fit_memory(load_config("folder", keys + ["prior.autocast=bfloat16"]), 1)
    assert ckpt.per_image < 0.3 * plain.per_image and bf16.per_image < 0.7 * plain.per_image
    assert check_fit_fits(load_config("folder", keys + ["ray.gpu_memory_gb=40", "prior.checkpointing=true"]), 1)
    assert check_fit_fits(load_config("folder", keys + ["ray.train_use_gpu=false"]), 1) is None
