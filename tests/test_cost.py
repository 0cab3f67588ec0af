"""`distill --dry-run`: the plan and its FLOP count, with no model loaded (works for imagenet1k on a CPU machine)."""
import re
import subprocess
import sys

import pytest

from conftest import load_bench
from lgd_ray.config import ConfigError, load_config
from lgd_ray.cost import run_cost


def test_imagenet1k_plan_counts():
    cfg = load_config("imagenet1k")
    plan = run_cost(cfg)
    assert plan["classes"] == 1000 and plan["chunks"] == 500 and plan["window_steps"] == 36
    # DiT-XL/2 at 256 px: 118.6 G multiply-adds per forward (the DiT paper's "Gflops") = 237 GFLOPs
    assert plan["costs"]["dit_forward"] == pytest.approx(2 * 118.6, rel=0.01)
    # backward to the input through frozen weights: about one more forward; a training step about three forwards
    assert plan["costs"]["decoder_grad"] == pytest.approx(2 * plan["costs"]["decoder"], rel=0.01)
    assert 2.8 < plan["costs"]["student_train"] / plan["costs"]["student"] < 3.0
    seed, guided = plan["stages"][0], plan["stages"][1]
    assert seed["trajectories"] == 10_000 and seed["guided_steps"] == 0 and seed["unguided_steps"] == 10_000 * 50
    assert guided["trajectories"] == 30_000 and guided["guided_steps"] == 30_000 * 36
    assert guided["unguided_steps"] == 30_000 * 14 and guided["sample_flops"] > 5 * seed["sample_flops"]
    assert [s["train_images"] for s in plan["stages"]] == [10_000, 20_000, 30_000, 40_000, 50_000]
    dit = run_cost(load_config("imagenet1k", ["distill.method=dit"]))
    assert all(s["guided_steps"] == 0 and s["trajectories"] == 10_000 for s in dit["stages"])


def test_plan_counts_every_kth_guidance_and_early_rejection():
    """every 2: indices 45, 43, .., 11 of [10, 45] (18); select_after 15: the 3 candidates run indices 49..35 (6 of
    them guided), the kept one 34..0 (12 guided); candidates are scored at the cut and the kept one at the end."""
    base = run_cost(load_config("imagenet1k"))
    plan = run_cost(load_config("imagenet1k", ["guidance.every=2", "guidance.select_after=15"]))
    assert plan["window_steps"] == 18
    st = plan["stages"][1]
    assert st["trajectories"] == 30_000 and st["guided_steps"] == 30_000 * 6 + 10_000 * 12
    assert st["guided_steps"] + st["unguided_steps"] == 30_000 * 15 + 10_000 * 35
    assert plan["stages"][0] == base["stages"][0]  # the unguided seed stage (kappa 1) is unchanged
    assert plan["total_flops"] < 0.5 * base["total_flops"]
    same = run_cost(load_config("imagenet1k", ["guidance.every=1", "guidance.select_after=50"]))
    assert same["total_flops"] == base["total_flops"]


def test_plan_agrees_with_the_cost_model_on_paper():
    """bench/cost_model.py counts the same run by hand from published numbers; the dry-run must agree."""
    paper, dry = load_bench("cost_model").paper_plan(), run_cost(load_config("imagenet1k"))
    assert paper["decoder"] == pytest.approx(dry["costs"]["decoder"] * 1e9, rel=1e-3)
    assert paper["dit_grad"] == pytest.approx(dry["costs"]["dit_grad"] * 1e9, rel=1e-3)
    assert paper["guided"] == pytest.approx(dry["guided_step_gflops"] * 1e9, rel=1e-3)
    assert paper["deviation"] == pytest.approx(dry["deviation_step_gflops"] * 1e9, rel=5e-3)  # a difference of two
    for p, d in zip(paper["stages"], dry["stages"], strict=True):
        assert p["sample"] == pytest.approx(d["sample_flops"], rel=1e-3)
        assert p["train"] == pytest.approx(d["train_flops"], rel=1e-3)
    assert paper["total"] == pytest.approx(dry["total_flops"], rel=1e-3)


def test_plan_reads_a_local_pipeline_folder(latent_pipeline_dir):
    cfg = load_config("imagenette", [f"prior.model_id={latent_pipeline_dir}"])
    costs = run_cost(cfg)["costs"]
    assert 0 < costs["dit_forward"] < 1 and costs["decoder"] > 0  # the toy DiT and its tiny VAE, not DiT-XL/2


def test_dry_run_command_prints_the_plan():
    r = subprocess.run([sys.executable, "-m", "lgd_ray.distill", "imagenet1k", "--dry-run", "--gpus", "64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1000 classes in 500 chunks" in r.stdout and "GPU-hours" in r.stdout and "NOT FOUND" in r.stdout
    held = float(re.search(r"^held ([\d.]+) GPU-h", r.stdout, re.M).group(1))
    busy = float(re.search(r"^busy ([\d.]+) GPU-h", r.stdout, re.M).group(1))
    assert 0 < busy < held and "x 25% (the guided step measured on an H200" in r.stdout
    assert "memory per sampler actor" in r.stdout and "the largest guidance.batch that fits" in r.stdout


def test_dry_run_of_a_fine_tune_counts_the_base_and_the_fit(tmp_path, capsys):
    """folder (prior.base fine-tuned): the samplers are counted with the base's shape (DiT-XL/2, not the pixel-DiT
    keys), and the prior's fit says its memory per worker; ray.train_workers auto says from how many workers it fits,
    a fixed count that cannot fit is refused in one line."""
    from lgd_ray.distill import dry_run
    from lgd_ray.gpu_memory import prior_fit_memory

    keys = [f"data.root={tmp_path}", "data.classes=imagenette"]
    dry_run(load_config("folder", keys), None, 0.3)
    out = capsys.readouterr().out
    assert "weights 3.11 GiB" in out  # DiT-XL/2 and its VAE in float32
    assert re.search(r"prior's fit .* 13\.97 GiB weights, gradients, AdamW and EMA \+ 0\.621 GiB per image x 256 images "
                     r"\(prior.batch_size 256 / 1 workers\): peak 172\.8 GiB; .*: fits from 4 workers "
                     r"\(ray.train_workers auto: at 1 worker\)", out)
    with pytest.raises(ConfigError, match="the prior's fit needs 93.4 GiB per Ray Train worker"):
        dry_run(load_config("folder", keys + ["ray.train_workers=2"]), None, 0.3)
    checkpointed = prior_fit_memory(load_config("folder", keys + ["prior.checkpointing=true"]), 2)
    assert round(checkpointed.peak() / 2**30, 1) == 21.2  # what the dry-run says for it


def test_deviation_guidance_is_counted_in_flops():
    """gamma > 0 adds, to every guided step of the stages after the seed, a second backward through the DiT's CFG pair
    (denoiser path); the imagenet1k dry-run's total says what it costs."""
    with_gamma, without = (run_cost(load_config("imagenet1k", [f"guidance.gamma={g}"])) for g in (50, 0))
    c = with_gamma["costs"]
    assert with_gamma["deviation_step_gflops"] == pytest.approx(2 * (c["dit_grad"] - c["dit_forward"]))
    assert without["deviation_step_gflops"] == 0
    for a, b in zip(with_gamma["stages"], without["stages"]):
        assert a["deviation_steps"] == (a["guided_steps"] if a["stage"] > 0 else 0) and b["deviation_steps"] == 0
        extra = a["deviation_steps"] * with_gamma["deviation_step_gflops"] * 1e9
        assert a["sample_flops"] - b["sample_flops"] == pytest.approx(extra)
    assert with_gamma["total_flops"] > 1.15 * without["total_flops"]
    x0 = run_cost(load_config("imagenet1k", ["guidance.gamma=50", "guidance.through=decoder"]))
    assert x0["deviation_step_gflops"] == 0  # on x0^ (through the decoder only) g_D needs no backward through the DiT


def test_cluster_cost_adds_barriers_start_up_and_idle_gpus_to_the_flops():
    """The held/busy model by hand: rounds of chunks per stage, fits on the kept actors (one, or DDP over two: no
    start-up); held = GPUs x wall, busy = the FLOPs at the rate."""
    from lgd_ray import cost

    cfg = load_config("imagenet1k")
    plan, rate = run_cost(cfg), 495e12 * 0.25
    one = cost.cluster_cost(replace_student_batch(cfg, 32), plan, 3, 495, 0.25)  # 32 images a step: one worker
    assert all(s["fit_workers"] == 1 for s in one["stages"])
    test_f = 50_000 * plan["costs"]["student"] * 1e9
    wall = cost.NODE_START_S + cost.ACTOR_START_S + sum(
        -(-500 // 3) * s["sample_flops"] / 500 / rate + (s["train_flops"] + test_f) / rate for s in plan["stages"])
    assert one["wall_h"] * 3600 == pytest.approx(wall) and one["held_gpu_h"] == pytest.approx(3 * one["wall_h"])
    busy = sum(s["sample_flops"] + s["train_flops"] + test_f for s in plan["stages"]) / rate / 3600
    assert one["busy_gpu_h"] == pytest.approx(busy)
    ddp = cost.cluster_cost(cfg, plan, 3, 495, 0.25)  # batch 64: DDP over two of the kept actors
    s = plan["stages"][1]
    assert ddp["stages"][1]["fit_workers"] == 2 and ddp["stages"][1]["fit_s"] == pytest.approx(
        (s["train_flops"] + test_f) / rate / 2)


def replace_student_batch(cfg, batch):
    from dataclasses import replace

    return replace(cfg, student=replace(cfg.student, train=replace(cfg.student.train, batch_size=batch)))


def test_cluster_file_gives_the_gpus_it_scales_to():
    from lgd_ray.cost import cluster_gpus_of

    assert cluster_gpus_of("clusters/aws.yaml", "H100") == 64  # gpu_h100: 8 nodes x 8 GPUs
    assert cluster_gpus_of("clusters/aws.yaml") == 128  # and gpu_a100: 8 x 8


def test_the_tiny_guidance_decoder_cuts_the_imagenet_guided_step_to_under_0_6x():
    """At DiT-XL/2-256 the VAE decoder is 56 % of the guided step; the tiny one stands in for it there only."""
    full = run_cost(load_config("imagenet1k"))
    tiny = run_cost(load_config("imagenet1k", ["guidance.decoder=tiny"]))
    assert tiny["guided_step_gflops"] <= 0.6 * full["guided_step_gflops"]
    assert tiny["unguided_step_gflops"] == full["unguided_step_gflops"]  # the final decode keeps the full decoder
    assert tiny["costs"]["decoder"] == full["costs"]["decoder"] and tiny["tiny_fit_flops"] > 0 == full["tiny_fit_flops"]
