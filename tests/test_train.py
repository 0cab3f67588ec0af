import torch

from lgd_ray.config import DataConfig, TrainConfig
from lgd_ray.data import load_split, to_float
from lgd_ray.models import build_classifier
from lgd_ray.train import accuracy, augment, load_classifier, save_classifier, train_classifier


def test_augment_is_seeded_and_keeps_identity_when_off():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(0), 0.5, True)
    b = augment(x, torch.Generator().manual_seed(0), 0.5, True)
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)
    same = augment(x, torch.Generator().manual_seed(0), 1.0, False)
    assert torch.allclose(same, x, atol=1e-5)  # scale 1, ratio within 3/4..4/3 clamped to the full image


def test_training_on_real_digits_and_safetensors_round_trip(tmp_path):
    cfg = DataConfig(name="digits", image_size=8)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    torch.manual_seed(0)
    model = build_classifier("convnet2", 1, 8, 10)
    seen = []
    train_classifier(model, train, TrainConfig(epochs=4, crop_scale=0.8, flip=False), seed=1,
                     on_epoch=lambda e, m, _: seen.append(m))
    acc = accuracy(model, test)
    assert acc > 0.85 and len(seen) == 4 and seen[-1]["train_loss"] < seen[0]["train_loss"]
    save_classifier(model, tmp_path / "m.safetensors", {"test_acc": acc})
    fresh, info = load_classifier(build_classifier("convnet2", 1, 8, 10), tmp_path / "m.safetensors")
    assert info["test_acc"] == acc and accuracy(fresh, test) == acc
    x = to_float(test.images[:5])
    assert torch.equal(fresh(x), model(x))


def test_a_fit_resumed_from_its_state_ends_where_the_whole_fit_ends():
    """Per-epoch generators + optimizer and scheduler state: resuming after epoch 1 gives the same weights (CPU)."""
    train = load_split(DataConfig(name="digits", image_size=8), "train")
    recipe = TrainConfig(epochs=4, batch_size=64, milestones=[0.5], cutmix=1.0, cutmix_prob=0.5)
    whole, saved = build_classifier("convnet2", 1, 8, 10, seed=0), {}
    train_classifier(whole, train, recipe, seed=3, on_epoch=lambda e, m, state: saved.setdefault(e, state()))
    resumed = build_classifier("convnet2", 1, 8, 10, seed=5)  # other initial weights: the state replaces them
    train_classifier(resumed, train, recipe, seed=3, resume=saved[1])
    assert saved[1]["epoch"] == 1 and saved[1]["scheduler"]["last_epoch"] == 2
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_shuffle_patches_permutes_strips_across_then_down():
    """RDED's ShufflePatches: factor 1 is the identity; factor 2 swaps halves (the last strip takes the remainder),
    each axis by its own draw, per image."""
    from lgd_ray.train import shuffle_patches

    x = torch.arange(2 * 1 * 5 * 4).reshape(2, 1, 5, 4)
    assert torch.equal(shuffle_patches(x, 1, torch.Generator().manual_seed(0)), x)
    seen = set()
    for seed in range(20):
        y = shuffle_patches(x, 2, torch.Generator().manual_seed(seed))
        for img, out in zip(x, y):
            rows = [img[:, :2], img[:, 2:]]
            cols = lambda t: [t[..., :2], t[..., 2:]]
            options = {tuple(torch.cat([c for c in cols_order], -1).flatten().tolist())
                       for r in (rows, rows[::-1]) for cols_order in (cols(torch.cat(r, 1)), cols(torch.cat(r, 1))[::-1])}
            assert tuple(out.flatten().tolist()) in options
            seen.add(tuple(out.flatten().tolist()))
    assert len(seen) > 4  # both axes' orders occur (4 per image, 2 images)
