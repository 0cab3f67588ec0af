"""Fidelity metrics in the reference's feature space: real-vs-real splits are near zero distance and near-full
precision / recall, far from what noise images give; bench/prior_fidelity.py runs on the tiny digits prior."""
import json

import numpy as np
import scipy.linalg
import torch

from conftest import load_bench
from lgd_ray.checkpoints import write_checkpoint
from lgd_ray.config import load_config
from lgd_ray.data import load_split, to_float
from lgd_ray.fidelity import features, fidelity, frechet_distance, precision_recall
from lgd_ray.prior import load_prior
from lgd_ray.prior_make import project_job


def _per_class(data, n):
    idx = torch.cat([(data.labels == c).nonzero().squeeze(1)[:n] for c in range(10)])
    return to_float(data.images[idx]), data.labels[idx]


def test_real_splits_are_close_and_noise_is_far(trained):
    _, reference, train, test = trained
    (xa, ya), (xb, yb) = _per_class(train, 40), _per_class(test, 40)
    a, b = features(reference, xa), features(reference, xb)
    assert abs(frechet_distance(a, a)) < 1e-4 and precision_recall(a, a) == (1.0, 1.0)
    # the eigenvalue form equals the textbook one with a matrix square root (full-rank covariances here)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(300, 16, generator=g, dtype=torch.float64), torch.randn(300, 16, generator=g, dtype=torch.float64)
    v = v @ torch.randn(16, 16, generator=g, dtype=torch.float64) + 0.5
    cu, cv = np.cov(u.numpy(), rowvar=False), np.cov(v.numpy(), rowvar=False)
    textbook = ((u.mean(0) - v.mean(0)) ** 2).sum().item() + np.trace(cu + cv - 2 * scipy.linalg.sqrtm(cu @ cv).real)
    assert abs(frechet_distance(u, v) - textbook) < 1e-8 * textbook
    real = fidelity(a, ya, b, yb)
    noise = fidelity(a, ya, features(reference, torch.rand_like(xb) * 2 - 1), yb)
    print(f"\nreal vs real: FD {real['fd']:.3f}, P {real['precision']:.2f}, R {real['recall']:.2f}; "
          f"vs noise: FD {noise['fd']:.3f}, P {noise['precision']:.2f}, R {noise['recall']:.2f}")
    assert real["fd"] < 0.2 * noise["fd"] and real["class_fd"] < 0.5 * noise["class_fd"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and noise["precision"] < 0.1
    assert len(real["per_class"]) == 10 and all(row["recall"] > 0.5 for row in real["per_class"])


def test_prior_fidelity_bench_on_the_tiny_prior(trained, tiny_overrides):
    rows = load_bench("prior_fidelity").main(["digits", *tiny_overrides, "--per-class", "8", "--schedulers", "ddim", "--cfg-scales", "2"])
    assert [r["setting"] for r in rows] == ["real train vs real test", "ddim CFG 2.0"]
    assert all(r["n"] == 80 and 0 <= r["precision"] <= 1 and r["fd"] >= 0 for r in rows)


def test_prior_curve_bench_measures_each_checkpoint_of_a_fit(trained, tiny_overrides, tmp_path):
    """bench/prior_curve.py: each checkpoint's EMA saved as a prior (loaded by prior.model_id) and measured; the
    last checkpoint's prior is the fit's own saved prior."""
    keys = [k for k in tiny_overrides if not k.startswith(("prior.train_steps", "cache="))]
    keys += ["prior.train_steps=20", "prior.checkpoint_steps=10", f"cache={tmp_path / 'cache'}"]
    cfg = load_config("digits", keys)
    job = project_job(cfg, lambda: load_split(cfg.data, "train"), 10)
    saved = {}
    weights, _ = job.run(on_round=lambda r, m, state: saved.__setitem__(r, state()))
    folders = []
    for r, state in saved.items():
        folders.append(tmp_path / f"checkpoint_{r:06d}")
        folders[-1].mkdir()
        write_checkpoint(folders[-1], state, r)
    load_bench("prior_curve").main(["digits", *map(str, folders), *keys, "--out", str(tmp_path / "curve"),
                                    "--per-class", "8", "--cfg-scale", "2"])
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [r["steps"] for r in curve["rows"]] == [10, 20] and [f["setting"] for f in curve["floors"]] == ["real train vs real test"]
    assert all(r["n"] == 80 and r["fd"] >= 0 for r in curve["rows"]) and (tmp_path / "curve" / "curve.png").exists()
    last = load_prior(curve["rows"][-1]["prior"]).transformer.state_dict()
    assert all(torch.equal(last[k], weights[k]) for k in weights)  # the fit's returned (EMA) weights
    # bench/prior_ema.py on the same checkpoints: the fit's EMA, the raw weights (decay 0) and a post-hoc EMA
    ema = load_bench("prior_ema")
    rows = ema.main(["digits", *map(str, folders), *keys, "--out", str(tmp_path / "ema"), "--decays", "0", "0.9",
                     "--per-class", "8", "--cfg-scale", "2"])
    assert [r["weights"] for r in rows] == ["the fit's EMA 0.999", "post-hoc 0.0", "post-hoc 0.9"]
    fit_ema, raw, mixed = (load_prior(r["prior"]).transformer.state_dict() for r in rows)
    assert all(torch.equal(fit_ema[k], weights[k]) for k in weights)
    raw_last = saved[max(saved)]["model"]
    assert all(torch.equal(raw[k], raw_last[k].float()) for k in raw_last)
    w = ema.ema_weights([10, 20], 0.9)  # 0.9^0 - 0.9^10 and 0.9^10 - 0.9^20, normalised
    assert abs(w[1] / w[0] - 1 / 0.9 ** 10) < 1e-9 and abs(sum(w) - 1) < 1e-12
    first = saved[min(saved)]["model"]
    assert all(torch.allclose(mixed[k].double(), w[0] * first[k].double() + w[1] * raw_last[k].double(), atol=1e-6)
               for k in raw_last)
    assert ema.ema_weights([10, 20, 30], 0.0) == [0.0, 0.0, 1.0]
