"""Measure 2: the batched guided sampler (32 trajectories a batch) vs a per-image loop, as the peers sample.

    python bench/batched_guidance.py [STEPS]      (default 10 DDIM steps, all of them guided)

For the pixel DiT of configs/fashion-mnist.yaml and for a latent DiT + VAE (bench/parts.py), with student and
reference ConvNet-3: LGD guidance through the denoiser, kappa 1, the same seeded trajectories. Prints images/s of
each way (and batches of 8 and 16 between), their ratio (goal >= 5x), and the ceiling that batching can reach on this machine: the same ratio for one
plain forward pass of each model (DiT pair, decoder, classifier). That an image does not depend on its batch is
tested with a trained prior (tests/test_sampler.py); random weights make x0^ leave [-1, 1], where the clamped
classifier input has almost no gradient, so its normalised direction is float noise and not worth comparing.
"""
import sys

import torch

from lgd_ray.sampler import generate
from parts import bench_guide, interleaved, machine, priors_with_scorers, verdict

IMAGES = 32
BATCHES = (1, 8, 16, 32)  # 1 is the per-image loop


def forward_ceiling(prior, scorer) -> dict[str, float]:
    """Speed-up of batch 32 over 32 batches of 1 for one forward pass of each model, no sampler around it."""
    x = torch.randn(IMAGES, *prior.latent_shape)
    t, y = torch.tensor(500), torch.arange(IMAGES) % prior.num_classes
    img = torch.randn(IMAGES, 3 if prior.vae is not None else prior.latent_shape[0], prior.image_size, prior.image_size)
    parts = {"DiT (CFG pair)": lambda a, b: prior.eps(x[a:b], t, y[a:b], 4.0), "classifier": lambda a, b: scorer.student(img[a:b])}
    if prior.vae is not None:
        parts["VAE decoder"] = lambda a, b: prior.decode(x[a:b])
    out = {}
    with torch.inference_mode():
        for name, fn in parts.items():
            med = interleaved({"batch": lambda: fn(0, IMAGES), "single": lambda: [fn(i, i + 1) for i in range(IMAGES)]},
                              repeats=3)
            out[name] = med["single"] / med["batch"]
    return out


def main(argv):
    steps = int(argv[0]) if argv else 10
    print(f"# measure 2: batched guided sampler vs per-image loop ({machine()})")
    print(f"{IMAGES} images, {steps} DDIM steps all guided (through the denoiser), CFG 4")
    for name, prior, scorer in priors_with_scorers():
        guide = bench_guide(scorer, prior.image_size, steps)
        items = [((97 * i) % prior.num_classes, i) for i in range(IMAGES)]

        def run(batch_size):
            return lambda: generate(prior, items, run_seed=0, stage=1, num_steps=steps, cfg_scale=4.0,
                                    batch_size=batch_size, image_size=prior.image_size, scorer=scorer, guide=guide)

        med = interleaved({b: run(b) for b in BATCHES}, repeats=3)
        print(f"\n{name}, {prior.image_size} px: images/s (median of 3) by batch size: " +
              ", ".join(f"{b}: {IMAGES / med[b]:.2f}" for b in BATCHES))
        print(f"  speed-up batch 32 / per image: {verdict(med[1] / med[IMAGES], 5.0)}; best batch "
              f"{min(BATCHES, key=med.get)}: {med[1] / min(med.values()):.2f}x")
        print("  ceiling, one forward pass batch 32 / per image: " +
              ", ".join(f"{k} {v:.2f}x" for k, v in forward_ceiling(prior, scorer).items()))


if __name__ == "__main__":
    main(sys.argv[1:])
