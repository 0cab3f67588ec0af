"""Classifier training and testing in plain PyTorch; in-memory tensors are batched without a DataLoader."""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import safetensors.torch
from tqdm.auto import tqdm

from lgd_ray import timeline
from lgd_ray.checkpoints import latest_checkpoint, load_from, save_to
from lgd_ray.config import ConfigError, RdedConfig, TrainConfig
from lgd_ray.data import PreparedSplit, TensorSet, to_float
from lgd_ray.models import build_classifier
from lgd_ray.seeding import derive_seed
from lgd_ray.storage import Location, as_location


def pick_device(name: str = "auto") -> torch.device:
    """The configured device ("auto": CUDA when there is one); on CUDA, float32 matmuls may use TF32 tensor cores
    (as cuDNN's convolutions already do), the rate `distill --dry-run` assumes."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return device


def process_device(name: str = "auto") -> torch.device:
    """This process's device. In a process Ray started (actor, task, Train worker): CUDA when Ray gave it GPUs, and
    then torch must see one (else one line naming torch's CUDA build), the CPU when it gave none (the GPUs are hidden
    from it). The driver of a Ray run: the CPU, never touching CUDA (its fits and chunks run in Ray's processes; a
    driver holding GPU memory outside Ray's accounting would shrink the next actor's). A run without Ray: `name`, the
    config's `device` key."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return pick_device(name)
    if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return torch.device("cpu")
    gpus = ray.get_gpu_ids()
    if not gpus:
        if not torch.cuda.is_initialized():
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Ray leaves them visible to a process given none
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: Ray gave this process GPU {', '.join(map(str, gpus))} on node "
                          f"{ray.util.get_node_ip_address()}, but torch {torch.__version__} (CUDA "
                          f"{torch.version.cuda or 'none: a CPU build'}) sees no GPU; install a torch CUDA build that the "
                          "node's driver supports")
    return pick_device("cuda")


# A progress bar factory: (total, description, initial) -> an object with update(n), set_description(s), close()
Bar = Callable[[int, str, int], object]


def terminal_bar(total: int, desc: str, initial: int = 0):
    """The progress of work in this process: a tqdm bar on a terminal, nothing elsewhere (logs, CI)."""
    return tqdm(total=total, desc=desc, initial=initial, disable=None, leave=False)


def augment(x: torch.Tensor, gen: torch.Generator, crop_scale: float, flip: bool) -> torch.Tensor:
    """Batched RandomResizedCrop(scale=(crop_scale, 1), ratio 3/4..4/3) + horizontal flip, one affine grid per image."""
    n = x.shape[0]
    u = torch.rand(n, 5, generator=gen).to(x.device)
    area = crop_scale + (1 - crop_scale) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    outside = (w > 1) | (h > 1)  # as torchvision falls back to the whole image when the crop does not fit
    w, h = torch.where(outside, 1.0, w), torch.where(outside, 1.0, h)
    cx = (1 - w) * (2 * u[:, 2] - 1)
    cy = (1 - h) * (2 * u[:, 3] - 1)
    sign = torch.where((u[:, 4] < 0.5) & flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def shuffle_patches(x: torch.Tensor, factor: int, gen: torch.Generator) -> torch.Tensor:
    """RDED's ShufflePatches per image: cut into `factor` strips across (the last takes the remainder), shuffle them,
    then the same down; factor 1 leaves the images as they are."""
    if factor == 1:
        return x

    def along(img: torch.Tensor, dim: int) -> torch.Tensor:
        size = img.shape[dim] // factor
        strips = list(img.split([size] * (factor - 1) + [img.shape[dim] - size * (factor - 1)], dim))
        return torch.cat([strips[k] for k in torch.randperm(factor, generator=gen).tolist()], dim)

    return torch.stack([along(along(img, 2), 1) for img in x])


def cutmix(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, beta: float):
    """CutMix: paste a random box of a shuffled copy of the batch; returns (x, y, y of the pasted images, share of y)."""
    n, _, h, w = x.shape
    rng = np.random.default_rng(int(torch.randint(1 << 62, (1,), generator=gen)))
    cut = math.sqrt(1 - rng.beta(beta, beta))
    bh, bw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1, x0, x1 = max(cy - bh // 2, 0), min(cy + bh // 2, h), max(cx - bw // 2, 0), min(cx + bw // 2, w)
    perm = torch.randperm(n, generator=gen).to(x.device)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return x, y, y[perm], 1 - (y1 - y0) * (x1 - x0) / (h * w)


def batches(data, batch_size: int, gen: torch.Generator, device, shuffle: bool):
    """(float images in [-1, 1], labels) on `device`; TensorSets are sliced directly, other sets go through a DataLoader."""
    if isinstance(data, TensorSet):
        images, labels = data.images.to(device), data.labels.to(device)  # no copy when already there
        order = torch.randperm(len(data), generator=gen) if shuffle else torch.arange(len(data))
        for i in range(0, len(data), batch_size):
            idx = order[i:i + batch_size].to(device)
            yield to_float(images[idx]), labels[idx]
        return
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                         num_workers=min(8, torch.get_num_threads()), persistent_workers=False)
    for x, y in loader:
        yield to_float(x.to(device)), y.to(device)


def train_classifier(model: torch.nn.Module, data, cfg: TrainConfig, seed: int, device="cpu",
                     on_epoch: Callable[[int, dict], None] | None = None, desc: str = "train",
                     teacher: torch.nn.Module | None = None, temperature: float = 4.0, batch_size: int = 0,
                     resume: dict | None = None, bar: Bar = terminal_bar,
                     rded: RdedConfig | None = None) -> torch.nn.Module:
    """SGD + MultiStepLR training on `data` (images uint8, labels int64); `seed` fixes order and augmentation.
    rded: the RDED protocol's optimiser, schedule, augmentation and KD loss instead (cfg's epochs and batch size).

    Each epoch draws from its own generator, seeded from (seed, epoch), so a fit resumed from `resume` (a `train_state`
    after some epoch) continues exactly as the uninterrupted fit would. batch_size: this process's batch (a DDP rank's
    part of cfg.batch_size); 0 = cfg.batch_size. on_epoch(epoch, metrics, state): state() is what resumes the fit
    after that epoch (weights, optimizer, scheduler as CPU tensors), for a checkpoint.
    With a teacher the targets are its softened predictions on the same augmented batch (KL at `temperature`).
    bar: the progress bar of the epochs (with the last epoch's loss).
    """
    device = torch.device(device)
    model.to(device).train()
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    if isinstance(data, TensorSet):  # the whole set moves to the device once, not batch by batch
        data = TensorSet(data.images.to(device), data.labels.to(device), data.num_classes)
    if rded is None:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        milestones = sorted({max(1, int(round(m * cfg.epochs))) for m in cfg.milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.lr_decay)
    else:
        params = list(model.parameters())
        opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1]},
                                 {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                                lr=rded.lr, betas=(0.9, 0.999), weight_decay=rded.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / cfg.epochs / 2)))
    first = 0
    if resume is not None:
        (model.module if hasattr(model, "module") else model).load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        first = resume["epoch"] + 1
    module = model.module if hasattr(model, "module") else model

    def state(epoch: int) -> dict:
        return {"epoch": epoch, "model": to_cpu(module.state_dict()), "optimizer": to_cpu(opt.state_dict()),
                "scheduler": to_cpu(sched.state_dict())}

    progress = bar(cfg.epochs, desc, first)
    for epoch in range(first, cfg.epochs):
        gen = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
        total, correct, loss_sum = 0, torch.zeros((), device=device), torch.zeros((), device=device)
        for x, y in batches(data, batch_size or cfg.batch_size, gen, device, shuffle=True):
            y_b = None
            if rded is not None:
                x = augment(shuffle_patches(x, rded.factor, gen), gen, 1 / rded.factor, True)
                x, y, y_b, share = cutmix(x, y, gen, rded.cutmix)
            else:
                x = augment(x, gen, cfg.crop_scale, cfg.flip)
                if cfg.cutmix > 0 and torch.rand(1, generator=gen).item() < cfg.cutmix_prob:
                    x, y, y_b, share = cutmix(x, y, gen, cfg.cutmix)
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    target = F.softmax(teacher(x) / temperature, dim=1)
                loss = F.kl_div(F.log_softmax(logits / temperature, 1), target, reduction="batchmean")
                if rded is None:
                    loss = loss * temperature ** 2  # Hinton's scaling; RDED's loss has none
            elif y_b is not None:
                loss = share * F.cross_entropy(logits, y) + (1 - share) * F.cross_entropy(logits, y_b)
            else:
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += len(y)  # the sums stay on the device: no synchronisation per batch
            correct += (logits.argmax(1) == y).sum()
            loss_sum += loss.detach() * len(y)
        sched.step()
        progress.update(1)
        if on_epoch or epoch % 10 == 0:
            stats = {"train_loss": loss_sum.item() / total, "train_acc": correct.item() / total}
            progress.set_description(f"{desc} loss {stats['train_loss']:.3f}")
            if on_epoch:
                on_epoch(epoch, stats, lambda epoch=epoch: state(epoch))
                model.train()  # the callback may have tested the model
    progress.close()
    return model.eval()


def to_cpu(tree):
    """A copy of a (nested) state dict with its tensors on the CPU (copied even when already there: the live state
    goes on changing)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_cpu(v) for v in tree]
    return copy.deepcopy(tree)


@torch.inference_mode()
def predict(model: torch.nn.Module, data, batch_size: int = 512, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the whole set."""
    model.to(device).eval()
    outs, ys = [], []
    for x, y in batches(data, batch_size, torch.Generator(), torch.device(device), shuffle=False):
        outs.append(model(x).float().cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def accuracy(model: torch.nn.Module, data, device="cpu") -> float:
    """Top-1 accuracy in [0, 1]."""
    logits, labels = predict(model, data, device=device)
    return (logits.argmax(1) == labels).float().mean().item()


def test_share(data, rank: int, world: int):
    """This rank's part of a test set: rows [len * rank // world, len * (rank + 1) // world), so that the ranks' parts
    cover the whole set once (nothing dropped, unlike a training share)."""
    if world == 1:
        return data
    lo, hi = len(data) * rank // world, len(data) * (rank + 1) // world
    if isinstance(data, PreparedSplit):
        return data.rows(lo, hi)
    if isinstance(data, TensorSet):
        return TensorSet(data.images[lo:hi], data.labels[lo:hi], data.num_classes)
    return torch.utils.data.Subset(data, range(lo, hi))


def ranked_accuracy(model: torch.nn.Module, data, device, rank: int, world: int) -> float:
    """Top-1 accuracy on the whole of `data`, each of `world` DDP ranks testing its part (summed over the ranks)."""
    logits, labels = predict(model, test_share(data, rank, world), device=device)
    counts = torch.tensor([(logits.argmax(1) == labels).sum().item(), len(labels)], dtype=torch.float64)
    if world > 1:
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def info_location(weights: Location) -> Location:
    """The JSON beside a weights file: x.safetensors -> x.json."""
    return Location(as_location(weights).uri.replace(".safetensors", ".json"))


def save_classifier(model: torch.nn.Module, loc: Location, info: dict,
                    write: Callable[[Location, bytes], None] = Location.write_bytes):
    """`info` as JSON, then the weights as safetensors (each one atomic write): weights present means both are.
    write(location, bytes): how each is written (a driver's run folder: through its lease)."""
    loc = as_location(loc)
    write(info_location(loc), json.dumps(info, indent=1).encode())
    write(loc, safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


def load_classifier(model: torch.nn.Module, loc: Location) -> tuple[torch.nn.Module, dict]:
    """Load safetensors weights into `model`; returns (model in eval mode, its info JSON)."""
    loc = as_location(loc)
    model.load_state_dict(safetensors.torch.load(loc.read_bytes()))
    return model.eval(), json.loads(info_location(loc).read_text())


@dataclass(kw_only=True)
class FitJob:
    """One classifier to train, picklable so that a Ray Train worker can run it as well as this process."""

    model: str
    channels: int
    image_size: int
    num_classes: int
    init_seed: int
    train: TrainConfig
    load_data: Callable[[], torch.utils.data.Dataset]  # e.g. functools.partial(load_split, data_cfg, "train")
    seed: int
    init_state: dict | None = None  # continue from these weights (theta_{i-1})
    name: str = "train"
    checkpoint_every: int = 10  # epochs between checkpoints (ray.checkpoint_every)
    checkpoints: str = ""  # "": the fitter's run folder, a fresh fit each time (see PriorJob.checkpoints)
    output: str = "model"  # the state returned: the trained weights
    load_test: Callable[[], torch.utils.data.Dataset] | None = None  # tested where it is trained: metrics["test_acc"]
    workers: int = 0  # DDP workers of a student's fit, sized by the stage loop (0: ray.train_workers, on Ray Train)

    @property
    def rounds(self) -> int:
        return self.train.epochs

    def run(self, device="cpu", rank: int = 0, world: int = 1, wrap=None, on_round=None, resume=None,
            bar: Bar = terminal_bar):
        """(the weights, metrics): metrics["phases"] is [(phase, start, end)] of the fit and the test, and
        metrics["test_acc"] the accuracy on load_test() (the ranks test a part each) when it is set."""
        start = time.time()
        model = fit(self, device, rank, world, wrap, on_round, resume, bar)
        module = model.module if hasattr(model, "module") else model
        metrics, fitted = {"phases": [("fit", start, time.time())]}, time.time()
        if self.load_test is not None:
            metrics["test_acc"] = ranked_accuracy(module, self.load_test(), device, rank, world)
            metrics["phases"].append(("test", fitted, time.time()))
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}, metrics

    def build(self) -> torch.nn.Module:
        model = build_classifier(self.model, self.channels, self.image_size, self.num_classes, seed=self.init_seed)
        if self.init_state is not None:
            model.load_state_dict(self.init_state)
        return model


def rank_slice(data, rank: int, world: int, seed: int):
    """This rank's equal share of `data` (a seeded split; the remainder is dropped so DDP ranks stay in step).

    Prepared shards are already in a seeded random order: a rank reads only the shards of its contiguous share.
    """
    if isinstance(data, PreparedSplit):
        return data.share(rank, world)
    if world == 1:
        return data
    per = len(data) // world
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[rank * per:(rank + 1) * per]
    if isinstance(data, TensorSet):
        return TensorSet(data.images[idx], data.labels[idx], data.num_classes)
    return torch.utils.data.Subset(data, idx.tolist())


def fit(job: FitJob, device="cpu", rank: int = 0, world: int = 1, wrap=None,
        on_epoch: Callable[[int, dict], None] | None = None, resume: dict | None = None,
        bar: Bar = terminal_bar) -> torch.nn.Module:
    """Build, (optionally wrap, e.g. in DDP,) and train the job's classifier on this rank's share of its data.

    With `world` ranks each takes batch_size / world images a step: DDP averages their gradients, so a step sees the
    config's global batch at the config's learning rate, whatever the number of workers.
    """
    if job.train.batch_size % world:
        raise ValueError(f"batch_size {job.train.batch_size} is not a multiple of the {world} workers")
    model = job.build()
    data = rank_slice(job.load_data(), rank, world, job.seed)
    model = wrap(model) if wrap else model
    seed = job.seed if world == 1 else derive_seed(job.seed, "rank", rank)
    return train_classifier(model, data, job.train, seed, device, on_epoch=on_epoch, desc=job.name,
                            batch_size=job.train.batch_size // world, resume=resume, bar=bar)


# trains a FitJob or a PriorJob somewhere; returns (the job's output state dict on the CPU, its final metrics, with
# metrics["spans"] the timeline spans of the processes that ran it: lgd_ray.timeline)
Fitter = Callable[[FitJob], tuple[dict, dict]]


def job_spans(metrics: dict, start: float, end: float, who: str, resources: dict) -> list[dict]:
    """The spans of one process's run of a job: its own phases (metrics["phases"]), else the whole run as a fit."""
    return [timeline.span(phase, a, b, who=who, resources=resources)
            for phase, a, b in metrics.pop("phases", None) or [("fit", start, end)]]


def in_process_fitter(device="cpu") -> Fitter:
    """Fits in this process (one slot: a CPU, or the device). A job with its own `checkpoints` folder gets a
    checkpoint there every job.checkpoint_every rounds and continues from the newest one an earlier fit left."""
    slot = {"GPU": 1} if torch.device(device).type == "cuda" else {"CPU": 1}

    def fit_here(job):
        start = time.time()
        state, metrics = run_here(job)
        metrics["spans"] = job_spans(metrics, start, time.time(), "in-process", slot)
        return state, metrics

    def run_here(job):
        if not job.checkpoints:
            return job.run(device)
        storage = Location(job.checkpoints)
        found = latest_checkpoint(storage, job.name)
        if found is not None:
            print(f"{job.name}: continuing from {found}", flush=True)
        run = storage / f"{job.name}-{uuid.uuid4().hex[:8]}"

        def on_round(round_: int, metrics: dict, state):
            if (round_ + 1) % job.checkpoint_every == 0:
                save_to(run / f"checkpoint_{round_:06d}", state(), round_)

        return job.run(device, on_round=on_round, resume=load_from(found) if found else None)

    return fit_here
