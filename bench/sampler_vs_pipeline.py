"""Measure 1: the unguided sampler (lgd_ray.sampler.sample + decode) vs diffusers' DiTPipeline, side by side.

    python bench/sampler_vs_pipeline.py [BATCH] [STEPS]      (default 16 images, 25 DDIM steps)

Same random-weight 1000-class latent DiT + VAE (bench/parts.py), CFG 4.0, same per-image generators: images/s of
each, their ratio (goal >= 1.0) and the largest absolute difference of the images in [0, 1] (goal < 1e-4).
"""
import sys

import torch

from diffusers import DiTPipeline

from lgd_ray.sampler import sample
from parts import LATENT_DIT, LATENT_VAE, interleaved, machine, saved_prior, verdict

CFG = 4.0


def main(argv):
    batch = int(argv[0]) if argv else 16
    steps = int(argv[1]) if len(argv) > 1 else 25
    folder, prior = saved_prior(LATENT_DIT, LATENT_VAE)
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    labels = [(97 * i) % 1000 for i in range(batch)]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]

    def ours():
        with torch.inference_mode():
            z, _ = sample(prior, torch.tensor(labels), gens(), steps, CFG)
            return (prior.decode(z) / 2 + 0.5).clamp(0, 1)

    def diffusers_pipeline():
        return pipe(labels, guidance_scale=CFG, generator=gens(), num_inference_steps=steps, output_type="pt").images

    diff = (ours() - diffusers_pipeline()).abs().max().item()
    med = interleaved({"lgd_ray": ours, "DiTPipeline": diffusers_pipeline}, repeats=5)
    print(f"# measure 1: unguided sampler vs diffusers DiTPipeline ({machine()})")
    print(f"latent DiT {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f} M params + VAE, "
          f"{prior.image_size} px, {batch} images, {steps} DDIM steps, CFG {CFG}")
    for k, s in med.items():
        print(f"{k:>12}: {batch / s:7.2f} images/s (median of 5: {s:.3f} s)")
    print(f"throughput lgd_ray / DiTPipeline: {verdict(med['DiTPipeline'] / med['lgd_ray'], 1.0)}")
    print(f"max |image difference|: {diff:.2e} (goal < 1e-4: {'met' if diff < 1e-4 else 'MISSED'})")


if __name__ == "__main__":
    main(sys.argv[1:])
