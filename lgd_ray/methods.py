"""The methods of the stage frame (docs/DESIGN.md section 2): `ChunkMaker` makes one chunk's shard at a time (the unit a
Ray sampler actor runs) as its stage's method says (lgd_ray/plan.py decides each stage's method and candidates).
"""
from __future__ import annotations

import time
from typing import Iterable

import torch

from lgd_ray.batching import free_cached_memory
from lgd_ray.config import Config, ConfigError
from lgd_ray.data import load_split, num_classes, open_prepared, to_float
from lgd_ray.dds import class_candidates, relevance_batch_size, select
from lgd_ray.guidance import Guide, Scorer
from lgd_ray.lease import check_holder
from lgd_ray.models import penultimate
from lgd_ray.modes import ModeGuide, class_modes
from lgd_ray.plan import ChunkTask, Stage, stage_plan
from lgd_ray.prior import load_prior, pipeline_image_size, prior_class_map, prior_id, require_prior
from lgd_ray.reference import load_reference, new_classifier
from lgd_ray.sampler import generate, sample_batch_size
from lgd_ray.seeding import derive_seed, generator
from lgd_ray.shards import read_shards, sample_record, shard_path, write_shard
from lgd_ray.storage import Location
from lgd_ray.tiny_decoder import load_tiny
from lgd_ray.train import process_device


def real_positions(n: int, c: int, slots: list[int], run_seed: int) -> list[int]:
    """Method `random`: for each slot of class c, a position among the class's n real images; one seeded order per
    class, so slots (numbered across the run) never repeat an image."""
    if max(slots) >= n:
        raise ConfigError(f"distill: class {c} has {n} real images, fewer than its {max(slots) + 1} slots")
    return torch.randperm(n, generator=generator(run_seed, "random", c))[slots].tolist()


def subset_positions(n: int, cap: int, run_seed: int, tag: str, c: int) -> list[int]:
    """All n positions, or a seeded subset of `cap` of them when 0 < cap < n."""
    if not cap or n <= cap:
        return list(range(n))
    return torch.randperm(n, generator=generator(run_seed, tag, c))[:cap].tolist()


def real_image_sizes(cfg: Config) -> list[int]:
    """The sizes at which the method reads real images class by class: random (and a real seed increment) at
    data.image_size; dds and mgd3 at the prior's resolution (when the prior is a folder or store URI the caller can
    read; a hub id says nothing)."""
    sizes = [cfg.data.image_size] if "random" in {s.method for s in stage_plan(cfg)} else []
    if cfg.distill.method in ("dds", "mgd3"):
        size = pipeline_image_size(prior_id(cfg)) if cfg.prior.model_id else cfg.data.image_size
        sizes += [size] if size else []
    return list(dict.fromkeys(sizes))


def check_real_images(cfg: Config):
    """Driver, before any actor starts: prepared data holds the class-sorted copies the method reads."""
    if cfg.data.prepared:
        split = open_prepared(cfg.data, "train")
        for size in real_image_sizes(cfg):
            split.require_by_class(size)


class ChunkMaker:
    """Holds the prior and the reference model; makes one chunk's shard at a time (what a sampler actor runs)."""

    def __init__(self, cfg: Config, run_dir: Location, device=None, holder: str = ""):
        """Loads what the driver made (prior, reference); a missing one is one line naming it, never trained here.
        holder: the lease holder of the driver it works for; a shard is written only while the lease names it."""
        self.cfg, self.run_dir, self.holder = cfg, run_dir, holder
        self.device = device or process_device(cfg.device)
        self.num_classes = num_classes(cfg.data)
        self.prior = None
        if cfg.distill.method != "random":
            self.prior = load_prior(require_prior(cfg), cfg.prior.scheduler, self.device, cfg.prior.dtype, cfg.local_cache)
            self.prior.class_map = prior_class_map(cfg, self.prior)
            if cfg.guidance.checkpointing:
                self.prior.checkpoint_blocks()
        self.tiny = None  # guidance.decoder tiny: the guided step's decoder (fitted by the driver)
        if cfg.distill.method == "lgd" and cfg.guidance.decoder == "tiny":
            self.tiny = load_tiny(cfg, self.prior, require_prior(cfg))
        reference, _ = load_reference(cfg, self.num_classes)
        self.reference = reference.to(self.device).requires_grad_(False)
        self._train_set = None
        self._modes: dict[int, torch.Tensor] = {}  # mgd3: per class, kept for the actor's lifetime
        # halved on a CUDA out-of-memory error, for the actor's lifetime
        self.guidance_batch = cfg.guidance.batch
        self.sample_batch = sample_batch_size(cfg.distill.sample_batch)
        self.dds_batch = relevance_batch_size(cfg.dds.batch_size)

    @property
    def train_set(self):
        if self._train_set is None:
            self._train_set = load_split(self.cfg.data, "train")
        return self._train_set

    def make(self, task: ChunkTask, student_state: dict | None, previous_shards: list[dict]) -> dict:
        """Make the chunk's images as the method says, write its shard, return its manifest row.

        student_state: theta_{i-1} (None for the seed stage); previous_shards: the shards of D_{i-1} holding
        these classes (the memory of deviation guidance).
        """
        cfg, stage = self.cfg, task.stage
        items = [(c, s) for c in task.classes for s in range(stage.slot0, stage.slot0 + stage.ipc)]
        scorer = None
        if student_state is not None:
            student = new_classifier(cfg, "student", self.num_classes)
            student.load_state_dict(student_state)
            scorer = Scorer(student.to(self.device).eval().requires_grad_(False), self.reference, cfg.guidance.omega)
        start = time.time()
        try:
            if stage.method == "random":
                samples = self._real(task, items, scorer)
            elif stage.method == "dds":
                samples = self._selected(task)
            else:
                samples = self._generated(task, stage, items, scorer, previous_shards)
        finally:  # the next chunk (a retry of this one too) or the fit after the stage starts from a clean allocator
            free_cached_memory(self.device)
        if self.holder:  # a stale driver's chunk (another driver took the run folder over) writes nothing
            check_holder(self.run_dir, self.holder)
        row = write_shard(self.run_dir, shard_path(stage.index, task.chunk), samples)
        scores = [x["meta"]["S"] for x in samples if x["meta"]["S"] is not None]
        row.update(stage=stage.index, chunk=task.chunk, classes=list(task.classes), seconds=round(time.time() - start, 2),
                   mean_S=sum(scores) / len(scores) if scores else None, S=[round(v, 4) for v in scores])
        # the batch sizes used, after any halving on out-of-memory
        if stage.method in ("dit", "mgd3", "lgd"):
            row["sample_batch"] = self.sample_batch.size
        if stage.method == "dds":
            row["dds_batch"] = self.dds_batch.size
        if stage.gradient:
            row["guidance_batch"] = self.guidance_batch
        return row

    def _real(self, task: ChunkTask, items: list[tuple[int, int]], scorer: Scorer | None) -> list[dict]:
        """Method `random`: real train images, at the classifiers' size, scored when a student exists."""
        picks, parts = [], []
        for c in task.classes:  # items are class-major: one read per class
            slots = [s for k, s in items if k == c]
            idx, images = self.train_set.class_images(c, self.cfg.data.image_size,
                                                      lambda n, c=c, slots=slots: real_positions(n, c, slots, self.cfg.seed))
            picks += idx
            parts.append(images)
        images = torch.cat(parts)
        scores = [(None, None, None)] * len(items)
        if scorer is not None:
            with torch.no_grad():
                s, ce_s, ce_r = scorer(to_float(images).to(self.device), torch.tensor([c for c, _ in items], device=self.device))
            scores = list(zip(s.tolist(), ce_s.tolist(), ce_r.tolist()))
        return [sample_record(c, s, img, stage=task.stage.index, real_index=i, S=sc[0], ce_student=sc[1],
                              ce_reference=sc[2], params={"method": "random"})
                for (c, s), i, img, sc in zip(items, picks, images, scores)]

    def _generated(self, task: ChunkTask, stage: Stage, items: list[tuple[int, int]], scorer: Scorer | None,
                   previous_shards: list[dict]) -> list[dict]:
        cfg, g = self.cfg, self.cfg.guidance
        params = {"method": stage.method, "cfg_scale": cfg.prior.cfg_scale, "num_steps": cfg.prior.num_steps}
        guide = None
        if stage.method == "lgd":
            guide = Guide.from_config(cfg, scorer, self._memory(previous_shards, task.classes) if g.gamma > 0 else None,
                                      self.guidance_batch, stage.index, self.tiny)
            params.update({"lambda": g.lambda_}, omega=g.omega, kappa=g.kappa, gamma=g.gamma, through=g.through,
                          every=g.every, select_after=g.select_after, augment=g.augment)
            if self.tiny is not None:
                params["decoder"] = "tiny"
        elif stage.method == "mgd3":
            guide = ModeGuide({c: self._class_modes(c) for c in task.classes}, g.mode_lambda, g.mode_stop)
            params.update(mode_lambda=g.mode_lambda, mode_stop=g.mode_stop)
        out = generate(self.prior, items, run_seed=cfg.seed, stage=stage.index, num_steps=cfg.prior.num_steps,
                       cfg_scale=cfg.prior.cfg_scale, batch_size=self.sample_batch,
                       image_size=cfg.data.image_size, kappa=stage.kappa, scorer=scorer, guide=guide,
                       select_after=g.select_after if stage.method == "lgd" else 0)
        if isinstance(guide, Guide):
            self.guidance_batch = guide.batch
        return [sample_record(o.cls, o.slot, o.image, stage=stage.index,
                              seed=derive_seed(cfg.seed, "noise", stage.index, o.cls, o.slot, o.candidate), S=o.score,
                              ce_student=o.ce_student, ce_reference=o.ce_reference, candidate=o.candidate,
                              candidate_S=o.candidate_scores, params=params)
                for o in out]

    def _selected(self, task: ChunkTask) -> list[dict]:
        """Method dds: per class, relevance-ranked crops of real images, diversified by k-means (lgd_ray/dds.py)."""
        cfg, d = self.cfg, self.cfg.dds
        crop_size = max(1, round(d.crop * self.prior.image_size))
        params = {"method": "dds", "timesteps": d.timesteps, "crop": d.crop, "candidates": d.candidates,
                  "features": d.features}
        samples = []
        for c in task.classes:
            idx, x = self._class_real(c, d.max_images, "dds-subset")
            x = to_float(x)
            cands = class_candidates(self.prior, x, c, idx, cfg.seed, d.timesteps, crop_size, d.candidates,
                                     self.dds_batch, cfg.data.image_size)
            crops = to_float(torch.stack([k.image for k in cands]))
            feats = (penultimate(self.reference, crops.to(self.device)).cpu() if d.features == "reference"
                     else crops.flatten(1))
            chosen = select(cands, feats, cfg.distill.total_ipc, derive_seed(cfg.seed, "dds-kmeans", c))
            samples += [sample_record(c, slot, k.image, stage=0, real_index=k.source, box=list(k.box),
                                      relevance=k.relevance, S=None, params=params)
                        for slot, k in enumerate(chosen)]
        return samples

    def _class_real(self, c: int, cap: int, tag: str) -> tuple[list[int], torch.Tensor]:
        """The class's real train images at the prior's resolution (all, or a seeded subset of `cap`): indices, uint8."""
        return self.train_set.class_images(c, self.prior.image_size,
                                           lambda n: subset_positions(n, cap, self.cfg.seed, tag, c))

    @torch.no_grad()
    def _class_modes(self, c: int) -> torch.Tensor:
        """mgd3: the class's k-means modes in the prior's space (VAE latents, or pixels at the prior's size)."""
        if c not in self._modes:
            x = to_float(self._class_real(c, self.cfg.guidance.mode_max_images, "mgd3-subset")[1])
            points = torch.cat([self._encode(x[i:i + 64]) for i in range(0, len(x), 64)])
            self._modes[c] = class_modes(points.cpu().float(), self.cfg.distill.total_ipc, derive_seed(self.cfg.seed, "mgd3", c))
        return self._modes[c]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the prior's space (resized to its resolution, then the VAE if it has one)."""
        x = x.to(self.device)
        if x.shape[-1] != self.prior.image_size:
            x = torch.nn.functional.interpolate(x, size=self.prior.image_size, mode="bilinear", antialias=True)
        return self.prior.encode(x)

    @torch.no_grad()
    def _memory(self, shards: list[dict], classes: Iterable[int]) -> dict[int, torch.Tensor]:
        """Latents of the already chosen images of these classes (encoded at the prior's resolution)."""
        memory = {}
        samples = read_shards(self.run_dir, shards)
        for c in classes:
            imgs = [s["image"] for s in samples if s["cls"] == c]
            if imgs:
                memory[c] = self._encode(to_float(torch.stack(imgs)))
        return memory
