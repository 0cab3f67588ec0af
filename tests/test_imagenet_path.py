"""The cluster code path at toy size: ImageFolder data, a 1000-class latent DiT given as prior.model_id (a folder
saved with save_pretrained, loaded as facebook/DiT-XL-2-256 is), a guided stage on local Ray."""
import numpy as np
import pytest
import ray
import torch
from PIL import Image

from lgd_ray.config import load_config
from lgd_ray.data import read_classlist
from lgd_ray.prior import load_prior, prior_class_map


def _imagefolder(root, wnids, size=16):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, w in enumerate(wnids):
            (root / split / w).mkdir(parents=True)
            colour = rng.integers(0, 256, 3)
            img = np.clip(colour + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / split / w / f"{w}_0.png")


def _overrides(root, model_dir, tmp_path, classes):
    return [f"data.root={root}", f"data.classes={classes}", "data.image_size=16", f"prior.model_id={model_dir}",
            "prior.num_steps=4", "guidance.window=[0,3]", "guidance.kappa=2", "guidance.gamma=0.5",
            "reference.model=convnet2", "student.model=convnet2", "reference.train.epochs=1", "student.train.epochs=1",
            "distill.seed_ipc=1", "distill.ipc_per_stage=1", "distill.stages=1", "distill.sample_batch=256",
            "ray.actors=2", "ray.num_cpus_per_actor=0.5", "ray.num_gpus_per_actor=0", "ray.train_workers=1",
            "ray.train_use_gpu=false", "ray.train_cpus_per_worker=1", f"cache={tmp_path / 'cache'}",
            f"out={tmp_path / 'run'}"]


def test_subset_labels_map_to_imagenet_indices(latent_pipeline_dir, tmp_path):
    wnids = read_classlist("imagenette")
    _imagefolder(tmp_path / "data", wnids)
    cfg = load_config("imagenette", _overrides(tmp_path / "data", latent_pipeline_dir, tmp_path, "imagenette"))
    prior = load_prior(str(latent_pipeline_dir))
    prior.class_map = prior_class_map(cfg, prior)
    imagenet = read_classlist("imagenet1k")
    assert prior.class_map.tolist() == [imagenet.index(w) for w in wnids]
    seen = []
    hook = prior.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()),
                                                       with_kwargs=True)
    with torch.no_grad():
        prior.eps(torch.zeros(2, 4, 8, 8), torch.tensor(500), torch.tensor([0, 9]), cfg_scale=4.0)
    hook.remove()
    assert seen[0].tolist() == [imagenet.index(wnids[0]), imagenet.index(wnids[9]), 1000, 1000]  # null = 1000


@pytest.mark.slow
def test_one_guided_stage_over_1000_classes(latent_pipeline_dir, tmp_path):
    """1000 classes in 8 chunks over 2 sampler actors (the classifier fits in this process: what is tested here is
    the chunking of the classes, not Ray Train, which costs ~14 s of start-up a fit)."""
    from lgd_ray.actors import SamplerPool
    from lgd_ray.stages import run_stages

    _imagefolder(tmp_path / "data", read_classlist("imagenet1k"))
    cfg = load_config("imagenet1k", _overrides(tmp_path / "data", latent_pipeline_dir, tmp_path, "imagenet1k")
                      + ["distill.classes_per_chunk=128"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = SamplerPool(cfg, tmp_path / "run")
    try:
        manifest = run_stages(cfg, tmp_path / "run", runner=pool)
    finally:
        pool.shutdown()
        ray.shutdown()
    for stage in (0, 1):
        rows = [r for r in manifest["shards"] if r["stage"] == stage]
        assert len(rows) == 8  # ceil(1000 / 128) chunks
        classes = [c for r in rows for c in r["classes"]]
        assert sorted(classes) == list(range(1000))  # every class, no overlap
        keys = [k for r in rows for k in r["keys"]]
        assert len(keys) == 1000 == len(set(keys))
    assert manifest["stages"]["1"]["mean_S"] is not None and manifest["prior"] == str(latent_pipeline_dir)


def test_an_imagenet_teacher_labels_a_subset(latent_pipeline_dir, tmp_path):
    """evaluate.teacher NAME@WEIGHTS (timm's ResNet-18, random weights: no hub here) teaches an ImageNet subset: its
    logits are the model's ImageNet rows of the subset's classes, on images normalised as timm says; a soft-label
    evaluation of a run trains with it and records it; what it cannot teach is refused in one line."""
    import subprocess
    import sys

    import timm
    from safetensors.torch import save_file

    from lgd_ray.config import ConfigError
    from lgd_ray.distill import distill
    from lgd_ray.evaluate import evaluate_run
    from lgd_ray.teachers import check_teacher, load_teacher

    _imagefolder(tmp_path / "data", read_classlist("imagenette"), size=32)
    model = timm.create_model("resnet18", num_classes=1000).eval()
    save_file(model.state_dict(), tmp_path / "resnet18.safetensors")
    teacher_key = f"evaluate.teacher=resnet18.tv_in1k@{tmp_path / 'resnet18.safetensors'}"
    cfg = load_config("imagenette", _overrides(tmp_path / "data", latent_pipeline_dir, tmp_path, "imagenette")
                      + ["data.image_size=32", "ray.enabled=false", teacher_key])
    teacher = load_teacher(cfg, 10)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    mean, std = (torch.tensor(model.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    imagenet = read_classlist("imagenet1k")
    rows = [imagenet.index(w) for w in read_classlist("imagenette")]
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(((x + 1) / 2 - mean) / std)[:, rows], atol=1e-5)

    distill(cfg)
    result = evaluate_run(tmp_path / "run", ["evaluate.labels=soft", "evaluate.repeats=1", "evaluate.epochs_by_ipc=[2]",
                                             "evaluate.ipc_breaks=[]", "evaluate.eval_every=1", teacher_key,
                                             f"data.root={tmp_path / 'data'}", f"cache={tmp_path / 'cache'}",
                                             "ray.enabled=false"])
    assert result["teacher"].startswith("resnet18.tv_in1k@") and result["labels"] == "soft"
    assert (tmp_path / "run" / "eval" / "convnet2-ipc2-soft-resnet18.tv_in1k.json").exists()

    for extra, match in ((["evaluate.teacher=resnet99"], "neither 'reference' nor a timm model name"),
                         (["data.classes=" + str(tmp_path / "mine.txt")], "1 not ImageNet wnids.*evaluate.teacher=reference")):
        (tmp_path / "mine.txt").write_text("n01440764\nzebra\n")
        with pytest.raises(ConfigError, match=match):
            check_teacher(load_config("imagenette", ["evaluate.labels=soft", teacher_key] + extra))
    with pytest.raises(ConfigError, match="needs RGB data, digits has 1 channel"):
        check_teacher(load_config("digits", ["evaluate.labels=soft", "evaluate.teacher=resnet18.tv_in1k"]))
    # no hub: one line naming the way out (HF_HUB_OFFLINE: at once, as a machine without internet after its retries)
    r = subprocess.run([sys.executable, "-c", "from lgd_ray.config import load_config\nfrom lgd_ray.teachers import "
                        "load_teacher\nload_teacher(load_config('imagenette'), 10)"], capture_output=True, text=True,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode != 0 and "the teacher resnet18.tv_in1k could not be loaded from the hub" in r.stderr
    assert "evaluate.teacher=resnet18.tv_in1k@FILE.safetensors" in r.stderr
