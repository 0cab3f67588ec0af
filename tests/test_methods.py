"""The comparison methods in the same frame: random real images and MGD3 mode guidance; the method table."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from lgd_ray.config import ConfigError, DistillConfig, load_config
from lgd_ray.data import to_float
from lgd_ray.distill import distill
from lgd_ray.methods import METHODS, real_positions
from lgd_ray.modes import ModeGuide, class_modes
from lgd_ray.sampler import generate
from lgd_ray.shards import in_order, read_shards
from lgd_ray.stages import run_stages


def test_real_positions_are_seeded_and_distinct():
    a, b, other = real_positions(6, 0, [0, 1, 2, 3], 7), real_positions(6, 0, [0, 1, 2, 3], 7), real_positions(6, 0, [0, 1, 2, 3], 8)
    assert a == b and a != other and len(set(a)) == 4 and all(0 <= p < 6 for p in a)
    assert real_positions(6, 1, [0, 1, 2, 3], 7) != a  # one order per class
    # slots are numbered across the run: stage 2's slots continue the same order, never repeating an image
    assert real_positions(6, 0, [4, 5], 7) == real_positions(6, 0, list(range(6)), 7)[4:]
    with pytest.raises(ConfigError, match="class 0 has 6 real images, fewer than its 7 slots"):
        real_positions(6, 0, [6], 7)


def test_random_method_run(trained, tiny_overrides, tmp_path):
    _, _, train_set, _ = trained
    cfg = load_config("digits", tiny_overrides + [f"out={tmp_path}", "distill.method=random", "distill.stages=1"])
    manifest = run_stages(cfg, tmp_path, log=lambda _: None)
    samples = read_shards(tmp_path, in_order(manifest["shards"]))
    assert len(samples) == 40
    for c in range(10):
        mine = [s for s in samples if s["cls"] == c]
        idx = [s["meta"]["real_index"] for s in mine]
        assert len(mine) == 4 and len(set(idx)) == 4
        assert all(torch.equal(s["image"], train_set.images[s["meta"]["real_index"]]) for s in mine)
        assert all(train_set.labels[i] == c for i in idx)
    assert manifest["prior"] is None and manifest["stages"]["1"]["mean_S"] is not None
    again = tmp_path / "again"
    manifest2 = run_stages(load_config("digits", tiny_overrides + [f"out={again}", "distill.method=random", "distill.stages=1"]),
                           again, log=lambda _: None)
    assert [r["sha256"] for r in manifest2["shards"]] == [r["sha256"] for r in manifest["shards"]]


def test_a_real_seed_increment_is_randoms_and_the_guided_stages_start_from_it(trained, tiny_overrides, tmp_path):
    """distill.seed_from=real: lgd's I_0 is method random's (the same shard bytes for the same run seed), the student
    theta_0 is trained on it as random's is, and I_1 is guided; dds has no seed increment to take."""
    runs = {}
    for name, keys in (("random", ["distill.method=random", "distill.stages=0"]),
                       ("real-seed", ["distill.seed_from=real", "distill.stages=1"])):
        out = tmp_path / name
        runs[name] = run_stages(load_config("digits", tiny_overrides + [f"out={out}"] + keys), out, log=lambda _: None)
    random, real_seed = runs["random"], runs["real-seed"]
    seed_shards = lambda m: [(r["path"], r["sha256"]) for r in m["shards"] if r["stage"] == 0]
    assert seed_shards(real_seed) == seed_shards(random) and seed_shards(random)
    assert real_seed["stages"]["0"]["student_acc"] == random["stages"]["0"]["student_acc"]
    guided = read_shards(tmp_path / "real-seed", [r for r in real_seed["shards"] if r["stage"] == 1])
    assert {s["meta"]["params"]["method"] for s in guided} == {"lgd"} and all(s["meta"]["S"] is not None for s in guided)
    with pytest.raises(ConfigError, match="'distill.seed_from' real needs a staged method"):
        distill(load_config("digits", ["distill.method=dds", "distill.seed_from=real"]))


def test_class_modes_kmeans():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([centres[i] + 0.1 * torch.randn(20 + 10 * i, 2) for i in range(3)])
    modes = class_modes(points, 3, seed=1)
    assert modes.shape == (3, 2)
    # largest cluster first, each mode on its cluster's centre
    assert torch.allclose(modes, centres.flip(0), atol=0.1)
    assert torch.equal(modes, class_modes(points, 3, seed=1))
    with pytest.raises(ValueError, match="at least"):
        class_modes(points[:2], 3, seed=0)


def test_mode_guidance_moves_samples_to_their_mode(trained, tiny_cfg):
    prior, _, train_set, _ = trained
    items = [(c, s) for c in range(10) for s in range(2)]
    modes = {c: class_modes(to_float(train_set.images[train_set.labels == c]), 2, seed=c) for c in range(10)}

    def dist(guide):
        out = generate(prior, items, run_seed=0, stage=0, num_steps=tiny_cfg.prior.num_steps,
                       cfg_scale=tiny_cfg.prior.cfg_scale, batch_size=64, image_size=8, guide=guide)
        return torch.stack([(to_float(o.image) - modes[o.cls][o.slot]).flatten().norm() for o in out])

    plain, guided = dist(None), dist(ModeGuide(modes, 0.3, stop=3))
    assert (guided < plain).all() and guided.mean() < 0.95 * plain.mean()
    assert torch.equal(dist(ModeGuide(modes, 0.0, stop=0)), plain)  # lambda_m 0: the unguided sampler



def test_the_method_table_is_the_only_place_that_switches_on_a_method():
    """Issue 43: a new method is one object in lgd_ray/methods.py's METHODS, not edits across the package."""
    pattern = re.compile(r"""method\s*(==|!=|\bin\b|\bnot in\b)\s*[("']""")
    package = Path(__file__).resolve().parent.parent / "lgd_ray"
    found = [f"{path.name}:{n}: {line.strip()}" for path in sorted(package.glob("*.py")) if path.name != "methods.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
    method = next(f for f in dataclasses.fields(DistillConfig) if f.name == "method")
    assert sorted(method.metadata["choices"]) == sorted(METHODS)
