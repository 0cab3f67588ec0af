"""The profile behind measures 2 and 3: torch.profiler's top operators while sampling 32 guided images.

    python bench/profile_guided.py [pixel|latent] [denoiser|decoder|none] [BATCH]      (default latent denoiser 32)

The models of bench/parts.py, 4 DDIM steps, all guided (none: unguided); one untimed run first.
"""
import sys

from torch.profiler import ProfilerActivity, profile

from lgd_ray.sampler import generate
from parts import bench_guide, machine, priors_with_scorers

STEPS, IMAGES = 4, 32


def main(argv):
    which = argv[0] if argv else "latent"
    through = argv[1] if len(argv) > 1 else "denoiser"
    batch = int(argv[2]) if len(argv) > 2 else IMAGES
    name, prior, scorer = next(p for p in priors_with_scorers() if p[0].startswith(which))
    guide = None if through == "none" else bench_guide(scorer, prior.image_size, STEPS, through)
    items = [(i % prior.num_classes, i) for i in range(IMAGES)]
    run = lambda: generate(prior, items, run_seed=0, stage=1, num_steps=STEPS, cfg_scale=4.0, batch_size=batch,
                           image_size=prior.image_size, scorer=scorer, guide=guide)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(f"# {name}, {IMAGES} images in batches of {batch}, {STEPS} steps, guidance: {through} ({machine()})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main(sys.argv[1:])
