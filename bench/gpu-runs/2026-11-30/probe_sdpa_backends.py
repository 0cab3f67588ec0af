import json, sys, tempfile, torch
sys.path.insert(0, "bench")
from gpu_check import _setup, _config
from lgd_ray.memory import guided_step_bytes, actor_memory, GIB
from lgd_ray.guidance import Guide, Scorer
from lgd_ray.models import build_classifier
from torch.nn.attention import sdpa_kernel, SDPBackend
dev = torch.device("cuda")
rows = []
backends = {"default": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
with tempfile.TemporaryDirectory() as folder:
    for dtype in ("float32", "bfloat16"):
        prior = _setup(False, dtype, folder, dev)
        t = prior.scheduler.timesteps[25]
        for name, be in backends.items():
            for b in (1, 2, 4):
                cfg = _config(False, dtype, [], folder, b)
                nets = [build_classifier(cfg.student.model, 3, cfg.data.image_size, 1000, seed=s).to(dev).eval().requires_grad_(False) for s in (1, 2)]
                row = {"dtype": dtype, "sdpa": name, "batch": b}
                if b == 1 and name == "default":
                    m = actor_memory(cfg); row["meta_per_traj_gib"] = m.guided_per_trajectory / GIB
                try:
                    ctx = sdpa_kernel(be) if be is not None else torch.enable_grad()
                    with ctx:
                        row["saved_gib"] = guided_step_bytes(cfg, prior, *nets, b) / GIB
                        x, labels = torch.randn(b, *prior.latent_shape, device=dev), torch.arange(b, device=dev)
                        guide = Guide.from_config(cfg, Scorer(*nets, omega=cfg.guidance.omega), None, batch=0)
                        torch.cuda.synchronize(); torch.cuda.empty_cache(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
                        guide.eps(prior, x, t, labels, 4.0); torch.cuda.synchronize()
                        row["step_peak_above_base_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
                        row["base_gib"] = base / GIB
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(row), flush=True); rows.append(row)
        del prior; torch.cuda.empty_cache()
import os
open(os.environ["OUT"] + "/probe.json", "w").write(json.dumps(rows, indent=1))
