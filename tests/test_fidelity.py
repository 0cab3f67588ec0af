"""Fidelity metrics in the reference's feature space: real-vs-real splits are near zero distance and near-full
precision / recall, far from what noise images give; bench/prior_fidelity.py runs on the tiny digits prior."""
import torch

from conftest import load_bench
from lgd_ray.data import to_float
from lgd_ray.fidelity import features, fidelity, frechet_distance, precision_recall


def _per_class(data, n):
    idx = torch.cat([(data.labels == c).nonzero().squeeze(1)[:n] for c in range(10)])
    return to_float(data.images[idx]), data.labels[idx]


def test_real_splits_are_close_and_noise_is_far(trained):
    _, reference, train, test = trained
    (xa, ya), (xb, yb) = _per_class(train, 40), _per_class(test, 40)
    a, b = features(reference, xa), features(reference, xb)
    assert abs(frechet_distance(a, a)) < 1e-4 and precision_recall(a, a) == (1.0, 1.0)
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
