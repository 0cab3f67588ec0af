import json, os, sys, tempfile, torch
sys.path.insert(0, "bench")
from gpu_check import _setup, _config
from lgd_ray.memory import saved_bytes, GIB, _meta_prior
from lgd_ray.models import build_classifier
devs = sys.argv[1:]
rows = []
with tempfile.TemporaryDirectory() as folder:
    for dev in devs:
        cfg = _config(False, "float32", [], folder, 4)
        if dev == "meta":
            prior, m = _meta_prior(cfg); nets = [m.student]
        else:
            prior = _setup(False, "float32", folder, torch.device(dev))
            nets = [build_classifier(cfg.student.model, 3, cfg.data.image_size, 1000, seed=1).to(dev).eval().requires_grad_(False)]
        t = prior.scheduler.timesteps[25]
        for b in (1, 2, 4):
            x = torch.randn(b, *prior.latent_shape, device=dev, requires_grad=True)
            y = torch.arange(b, device=dev)
            img = torch.randn(b, 3, 128, 128, device=dev, requires_grad=True)
            row = {"device": dev, "batch": b}
            with torch.enable_grad():
                row["dit_pair"] = saved_bytes(lambda: prior.eps(x, t, y, 4.0), [prior.transformer]) / GIB
                row["decoder"] = saved_bytes(lambda: prior.decode(x), [prior.vae]) / GIB
                row["classifier"] = saved_bytes(lambda: nets[0](img), nets) / GIB
            print(json.dumps(row), flush=True); rows.append(row)
if "OUT" in os.environ:
    open(os.environ["OUT"] + "/probe2.json", "w").write(json.dumps(rows, indent=1))
