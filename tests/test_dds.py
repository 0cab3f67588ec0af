"""Method dds: the label's help in explaining the noise localises the class; k-means picks IPC distinct crops."""
import pytest
import torch

from lgd_ray.config import load_config
from lgd_ray.data import TensorSet, to_float, to_uint8
from lgd_ray.dds import Candidate, relevance_maps, select, top_crops
from lgd_ray.prior import load_prior
from lgd_ray.prior_fit import train_prior
from lgd_ray.prior_make import project_job
from lgd_ray.seeding import generator
from lgd_ray.shards import in_order, read_shards
from lgd_ray.stages import run_stages
from lgd_ray.train import in_process_fitter


def _left_half_set(n: int, seed: int) -> TensorSet:
    """8x8 images whose left half shows the class (4 patterns) and whose right half is noise for every class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    stripes = torch.tensor([1.0, -1.0]).repeat(4)
    patterns = [torch.ones(8, 4), -torch.ones(8, 4), stripes[:4].expand(8, 4), stripes[:8, None].expand(8, 4)]
    for i, c in enumerate(labels.tolist()):
        x[i, 0, :, :4] = patterns[c]
    return TensorSet(to_uint8(x), labels, 4)


def test_relevance_peaks_where_the_class_is(tmp_path):
    # patch 2: 2x2-px tokens resolve the halves (the digits config's own prior has patch 4)
    cfg = load_config("digits", ["prior.train_steps=400", "prior.patch_size=2", "prior.depth=2", "prior.num_heads=2",
                                 "prior.head_dim=32", "prior.batch_size=64", f"cache={tmp_path}"])
    train_prior(project_job(cfg, lambda: _left_half_set(512, 0), 4), tmp_path / "prior", in_process_fitter())
    prior = load_prior(str(tmp_path / "prior"), "ddim")
    test = _left_half_set(32, 1)
    maps = relevance_maps(prior, to_float(test.images), test.labels, [100, 300, 500],
                          [generator(0, "dds", i) for i in range(32)])
    left, right = maps[:, :, :4].mean(dim=(1, 2)), maps[:, :, 4:].mean(dim=(1, 2))
    assert (left > right).float().mean() >= 0.9 and left.mean() > 5 * right.abs().mean()
    wins = top_crops(maps, 4, 2)
    # the best 4x4 window is the left half's (one of 5 columns): 24-28 of 32 over prior seeds 0-2 at 400 and 800 steps
    assert sum(w[0][2] == 0 for w in wins) >= 0.75 * len(wins)
    assert all(len(w) == 2 and w[0][0] >= w[1][0] for w in wins)


def test_select_keeps_one_per_cluster():
    torch.manual_seed(0)
    feats = torch.cat([torch.randn(6, 3) * 0.05 + 5 * torch.eye(3)[i] for i in range(3)])
    cands = [Candidate(torch.full((1, 2, 2), i, dtype=torch.uint8), float(i % 6), i, (0, 0, 2)) for i in range(18)]
    chosen = select(cands, feats, 3, seed=0)
    assert sorted(c.source for c in chosen) == [5, 11, 17]  # the best-scored member of each cluster
    assert [c.source for c in select(cands, feats, 3, seed=0)] == [c.source for c in chosen]
    with pytest.raises(ValueError, match="at least"):
        select(cands[:2], feats[:2], 3, seed=0)


def test_dds_run_gives_ipc_distinct_images_per_class(trained, tiny_overrides, tmp_path):
    _, _, train_set, _ = trained
    keys = tiny_overrides + ["distill.method=dds", "dds.max_images=30", "dds.candidates=2", "dds.timesteps=[200,500]"]
    manifest = run_stages(load_config("digits", keys + [f"out={tmp_path / 'a'}"]), tmp_path / "a", log=lambda _: None)
    assert list(manifest["stages"]) == ["0"]  # one increment of all 2 + 2 x 2 = 6 IPC
    samples = read_shards(tmp_path / "a", in_order(manifest["shards"]))
    for c in range(10):
        mine = [s for s in samples if s["cls"] == c]
        assert len(mine) == 6 and len({bytes(s["image"].numpy()) for s in mine}) == 6
        assert all(train_set.labels[s["meta"]["real_index"]] == c for s in mine)
        assert all(s["image"].shape == (1, 8, 8) for s in mine)
    again = run_stages(load_config("digits", keys + [f"out={tmp_path / 'b'}"]), tmp_path / "b", log=lambda _: None)
    assert [r["sha256"] for r in again["shards"]] == [r["sha256"] for r in manifest["shards"]]


def test_out_of_memory_in_the_relevance_pass_halves_the_batch_with_the_same_candidates(trained, monkeypatch, capsys):
    """The DiT raises torch's out-of-memory error on more than 2 images: the relevance batch of 8 halves to 4 and 2
    and the candidates are those of a run at batch 2."""
    from lgd_ray.dds import class_candidates, relevance_batch_size

    prior, _, train_set, _ = trained
    idx = (train_set.labels == 3).nonzero()[:8, 0].tolist()
    images = to_float(train_set.images[idx])
    run = lambda batch: class_candidates(prior, images, 3, idx, 0, [100, 300], 6, 2, batch, 8)
    small = run(2)
    eps = prior.eps

    def capped(x, *a, **k):
        if len(x) > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test cap 2, asked {len(x)})")
        return eps(x, *a, **k)

    monkeypatch.setattr(prior, "eps", capped)
    sizes = relevance_batch_size(8)
    halved = run(sizes)
    assert sizes.size == 2 and "dds: out of memory at 8 images per relevance batch; now 4" in capsys.readouterr().out
    assert [(c.source, c.box) for c in halved] == [(c.source, c.box) for c in small]
    assert all(torch.equal(a.image, b.image) and abs(a.relevance - b.relevance) < 1e-4 for a, b in zip(small, halved))
