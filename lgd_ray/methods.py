"""The methods (docs/DESIGN.md section 2), one object each in one table, `METHODS`: what a method needs (a prior,
real images at which size), its stage plan, how it makes one chunk's images, what its rows record and which configs
it refuses. Nothing outside this table switches on a method's name.

`ChunkMaker` holds what every method draws on (the prior, theta*, the train split, the batch sizes that halve on
out-of-memory) and makes one chunk's shard at a time (the unit a Ray sampler actor runs) with its stage's method.
"""
from __future__ import annotations

import time
from typing import Iterable

import torch

from lgd_ray.batching import free_cached_memory
from lgd_ray.config import Config, ConfigError
from lgd_ray.data import load_split, num_classes, open_prepared, to_float
from lgd_ray.dds import class_candidates, relevance_batch_size, select
from lgd_ray.guidance import Guide, Scorer, guidance_batch_size
from lgd_ray.lease import check_holder
from lgd_ray.models import penultimate
from lgd_ray.modes import ModeGuide, class_modes
from lgd_ray.plan import ChunkTask, Stage
from lgd_ray.prior import configured_prior, pipeline_image_size, prior_id, require_prior
from lgd_ray.reference import load_reference, new_classifier
from lgd_ray.sampler import generate, sample_batch_size
from lgd_ray.seeding import derive_seed, generator
from lgd_ray.shards import read_shards, sample_record, shard_path, write_shard
from lgd_ray.storage import Location
from lgd_ray.tiny_decoder import load_tiny
from lgd_ray.train import process_device


class Method:
    """A method of the stage frame. The defaults are a staged method sampling the prior: a seed increment of
    distill.seed_ipc (real images with distill.seed_from real) and distill.stages increments of ipc_per_stage."""

    name = ""
    needs_prior = True  # the DiT prior: made by the driver, loaded by every sampler actor
    reads_real_at = ""  # "data" | "prior": the size at which it reads real images class by class; "" = none
    guided = False  # its increments may follow a gradient (the guidance keys apply)
    seed_method = ""  # what makes a generated seed increment; "" = the method itself

    def stages(self, cfg: Config) -> list[Stage]:
        d = cfg.distill
        seed = Stage(index=0, ipc=d.seed_ipc, slot0=0, kappa=1, gradient=False,
                     method="random" if d.seed_from == "real" else self.seed_method or self.name)
        return [seed] + [Stage(index=i, ipc=d.ipc_per_stage, slot0=d.seed_ipc + (i - 1) * d.ipc_per_stage,
                               method=self.name, kappa=self.kappa(cfg), gradient=self.gradient(cfg))
                         for i in range(1, d.stages + 1)]

    def kappa(self, cfg: Config) -> int:
        return 1

    def gradient(self, cfg: Config) -> bool:
        return False

    def uses_tiny_decoder(self, cfg: Config) -> bool:
        return False

    def check(self, cfg: Config):
        """Refuse, in one line, a config this method cannot run."""

    def make(self, maker: "ChunkMaker", task: ChunkTask, items: list[tuple[int, int]], scorer: Scorer | None,
             previous_shards: list[dict]) -> list[dict]:
        """The chunk's samples ({key, image, cls, meta}), one per (class, slot) of `items`."""
        raise NotImplementedError

    def batches(self, maker: "ChunkMaker", stage: Stage) -> dict:
        """What a row records of the batch sizes used (after any halving on out-of-memory)."""
        return {"sample_batch": maker.sample_batch.size}


class Random(Method):
    """Real train images, a seeded subset per class (and the seed increment of any method with seed_from real)."""

    name, needs_prior, reads_real_at = "random", False, "data"

    def make(self, maker, task, items, scorer, previous_shards):
        picks, parts = [], []
        for c in task.classes:  # items are class-major: one read per class
            slots = [s for k, s in items if k == c]
            idx, images = maker.train_set.class_images(
                c, maker.cfg.data.image_size, lambda n, c=c, slots=slots: real_positions(n, c, slots, maker.cfg.seed))
            picks += idx
            parts.append(images)
        images = torch.cat(parts)
        scores = [(None, None, None)] * len(items)
        if scorer is not None:
            with torch.no_grad():
                s, ce_s, ce_r = scorer(to_float(images).to(maker.device),
                                       torch.tensor([c for c, _ in items], device=maker.device))
            scores = list(zip(s.tolist(), ce_s.tolist(), ce_r.tolist()))
        return [sample_record(c, s, img, stage=task.stage.index, real_index=i, S=sc[0], ce_student=sc[1],
                              ce_reference=sc[2], params={"method": "random"})
                for (c, s), i, img, sc in zip(items, picks, images, scores)]

    def batches(self, maker, stage):
        return {}


class Dit(Method):
    """The prior's unguided samples (classifier-free guided at prior.cfg_scale)."""

    name = "dit"

    def guide(self, maker: "ChunkMaker", task: ChunkTask, previous_shards: list[dict], scorer: Scorer | None):
        """(the guide of this method's sampling, the parameters its samples record); no guide by default."""
        return None, {}

    def make(self, maker, task, items, scorer, previous_shards):
        cfg, stage = maker.cfg, task.stage
        guide, extra = self.guide(maker, task, previous_shards, scorer)
        params = {"method": stage.method, "cfg_scale": cfg.prior.cfg_scale, "num_steps": cfg.prior.num_steps, **extra}
        out = generate(maker.prior, items, run_seed=cfg.seed, stage=stage.index, num_steps=cfg.prior.num_steps,
                       cfg_scale=cfg.prior.cfg_scale, batch_size=maker.sample_batch, image_size=cfg.data.image_size,
                       kappa=stage.kappa, scorer=scorer, guide=guide, select_after=self.select_after(cfg))
        return [sample_record(o.cls, o.slot, o.image, stage=stage.index,
                              seed=derive_seed(cfg.seed, "noise", stage.index, o.cls, o.slot, o.candidate), S=o.score,
                              ce_student=o.ce_student, ce_reference=o.ce_reference, candidate=o.candidate,
                              candidate_S=o.candidate_scores, params=params)
                for o in out]

    def select_after(self, cfg: Config) -> int:
        return 0


class Mgd3(Dit):
    """MGD3: x0^ pulled towards its class's k-means modes (of real images in the prior's space) early in sampling."""

    name, reads_real_at = "mgd3", "prior"

    def guide(self, maker, task, previous_shards, scorer):
        g = maker.cfg.guidance
        return (ModeGuide({c: maker.class_modes(c) for c in task.classes}, g.mode_lambda, g.mode_stop),
                {"mode_lambda": g.mode_lambda, "mode_stop": g.mode_stop})


class Lgd(Dit):
    """LGD: a dit seed increment, then increments whose samples follow grad S (and, gamma > 0, away from the class's
    earlier images) inside the guidance window; the best of kappa candidates by S is kept (rank selection)."""

    name, guided, seed_method = "lgd", True, "dit"

    def kappa(self, cfg):
        return cfg.guidance.kappa

    def gradient(self, cfg):
        return cfg.guidance.active

    def uses_tiny_decoder(self, cfg):
        return cfg.guidance.decoder == "tiny"

    def check(self, cfg):
        if cfg.prior.dtype == "float16" and cfg.guidance.active:
            raise ConfigError("config: 'prior.dtype' float16 with guided lgd: its gradients underflow without loss "
                              "scaling (guidance silently off); use bfloat16")

    def guide(self, maker, task, previous_shards, scorer):
        g = maker.cfg.guidance
        memory = maker.deviation_memory(previous_shards, task.classes) if g.gamma > 0 else None
        guide = Guide.from_config(maker.cfg, scorer, memory, maker.guidance_batch, task.stage.index, maker.tiny)
        params = {"lambda": g.lambda_, "omega": g.omega, "kappa": g.kappa, "gamma": g.gamma, "through": g.through,
                  "every": g.every, "select_after": g.select_after, "augment": g.augment}
        if maker.tiny is not None:
            params["decoder"] = "tiny"
        return guide, params

    def select_after(self, cfg):
        return cfg.guidance.select_after

    def batches(self, maker, stage):
        return {"sample_batch": maker.sample_batch.size,
                **({"guidance_batch": maker.guidance_batch.size} if stage.gradient else {})}


class Dds(Method):
    """DDS: per class, real crops ranked by the prior's denoising relevance, diversified by k-means; all IPC at once."""

    name, reads_real_at = "dds", "prior"

    def stages(self, cfg):
        return [Stage(index=0, ipc=cfg.distill.total_ipc, slot0=0, method=self.name, kappa=1, gradient=False)]

    def check(self, cfg):
        if cfg.distill.seed_from == "real":
            raise ConfigError("config: 'distill.seed_from' real needs a staged method (dit, mgd3, lgd): dds selects "
                              "all its images in one increment")

    def make(self, maker, task, items, scorer, previous_shards):
        cfg, d = maker.cfg, maker.cfg.dds
        crop_size = max(1, round(d.crop * maker.prior.image_size))
        params = {"method": "dds", "timesteps": d.timesteps, "crop": d.crop, "candidates": d.candidates,
                  "features": d.features}
        samples = []
        for c in task.classes:
            idx, x = maker.class_real(c, d.max_images, "dds-subset")
            x = to_float(x)
            cands = class_candidates(maker.prior, x, c, idx, cfg.seed, d.timesteps, crop_size, d.candidates,
                                     maker.dds_batch, cfg.data.image_size)
            crops = to_float(torch.stack([k.image for k in cands]))
            feats = (penultimate(maker.reference, crops.to(maker.device)).cpu() if d.features == "reference"
                     else crops.flatten(1))
            chosen = select(cands, feats, cfg.distill.total_ipc, derive_seed(cfg.seed, "dds-kmeans", c))
            samples += [sample_record(c, slot, k.image, stage=0, real_index=k.source, box=list(k.box),
                                      relevance=k.relevance, S=None, params=params)
                        for slot, k in enumerate(chosen)]
        return samples

    def batches(self, maker, stage):
        return {"dds_batch": maker.dds_batch.size}


METHODS: dict[str, Method] = {m.name: m for m in (Random(), Dit(), Mgd3(), Dds(), Lgd())}


def method_of(cfg: Config) -> Method:
    """The run's method (distill.method)."""
    return METHODS[cfg.distill.method]


def stage_plan(cfg: Config) -> list[Stage]:
    """The run's stages: what each makes, how many images per class, with how many candidates, guided or not."""
    return method_of(cfg).stages(cfg)


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
    """The sizes at which the run's stages read real images class by class: random (and a real seed increment) at
    data.image_size; dds and mgd3 at the prior's resolution (when the prior is a folder or store URI the caller can
    read; a hub id says nothing)."""
    sizes = []
    for where in dict.fromkeys(METHODS[s.method].reads_real_at for s in stage_plan(cfg)):
        if where == "data":
            sizes.append(cfg.data.image_size)
        elif where == "prior":
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
        method = method_of(cfg)
        self.prior = self.tiny = None  # tiny: the guided step's decoder with guidance.decoder tiny (made by the driver)
        if method.needs_prior:
            self.prior = configured_prior(cfg, require_prior(cfg), self.device)
            if cfg.guidance.checkpointing:
                self.prior.checkpoint_blocks()
            if method.uses_tiny_decoder(cfg):
                self.tiny = load_tiny(cfg, self.prior, require_prior(cfg))
        reference, _ = load_reference(cfg, self.num_classes)
        self.reference = reference.to(self.device).requires_grad_(False)
        self._train_set = None
        self._modes: dict[int, torch.Tensor] = {}  # mgd3: per class, kept for the actor's lifetime
        # halved on a CUDA out-of-memory error, for the actor's lifetime
        self.guidance_batch = guidance_batch_size(cfg.guidance.batch)
        self.sample_batch = sample_batch_size(cfg.distill.sample_batch)
        self.dds_batch = relevance_batch_size(cfg.dds.batch_size)

    @property
    def train_set(self):
        if self._train_set is None:
            self._train_set = load_split(self.cfg.data, "train")
        return self._train_set

    def make(self, task: ChunkTask, student_state: dict | None, previous_shards: list[dict]) -> dict:
        """Make the chunk's images with its stage's method, write its shard, return its manifest row.

        student_state: theta_{i-1} (None for the seed stage); previous_shards: the shards of D_{i-1} holding
        these classes (the memory of deviation guidance).
        """
        cfg, stage = self.cfg, task.stage
        method = METHODS[stage.method]
        items = [(c, s) for c in task.classes for s in range(stage.slot0, stage.slot0 + stage.ipc)]
        scorer = None
        if student_state is not None:
            student = new_classifier(cfg, "student", self.num_classes)
            student.load_state_dict(student_state)
            scorer = Scorer(student.to(self.device).eval().requires_grad_(False), self.reference, cfg.guidance.omega)
        start = time.time()
        try:
            samples = method.make(self, task, items, scorer, previous_shards)
        finally:  # the next chunk (a retry of this one too) or the fit after the stage starts from a clean allocator
            free_cached_memory(self.device)
        if self.holder:  # a stale driver's chunk (another driver took the run folder over) writes nothing
            check_holder(self.run_dir, self.holder)
        row = write_shard(self.run_dir, shard_path(stage.index, task.chunk), samples)
        scores = [x["meta"]["S"] for x in samples if x["meta"]["S"] is not None]
        row.update(stage=stage.index, chunk=task.chunk, classes=list(task.classes), seconds=round(time.time() - start, 2),
                   mean_S=sum(scores) / len(scores) if scores else None, S=[round(v, 4) for v in scores])
        row.update(method.batches(self, stage))
        return row

    def class_real(self, c: int, cap: int, tag: str) -> tuple[list[int], torch.Tensor]:
        """The class's real train images at the prior's resolution (all, or a seeded subset of `cap`): indices, uint8."""
        return self.train_set.class_images(c, self.prior.image_size,
                                           lambda n: subset_positions(n, cap, self.cfg.seed, tag, c))

    @torch.no_grad()
    def class_modes(self, c: int) -> torch.Tensor:
        """mgd3: the class's k-means modes in the prior's space (VAE latents, or pixels at the prior's size)."""
        if c not in self._modes:
            x = to_float(self.class_real(c, self.cfg.guidance.mode_max_images, "mgd3-subset")[1])
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
    def deviation_memory(self, shards: list[dict], classes: Iterable[int]) -> dict[int, torch.Tensor]:
        """Latents of the already chosen images of these classes (encoded at the prior's resolution)."""
        memory = {}
        samples = read_shards(self.run_dir, shards)
        for c in classes:
            imgs = [s["image"] for s in samples if s["cls"] == c]
            if imgs:
                memory[c] = self._encode(to_float(torch.stack(imgs)))
        return memory
