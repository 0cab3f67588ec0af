"""Measure 3: the cost of a learnability-guided image against an unguided one, for both gradient paths.

    python bench/guided_cost.py [STEPS]      (default 10 DDIM steps, every one guided)

For the pixel DiT of configs/fashion-mnist.yaml and for a latent DiT + VAE (bench/parts.py), 32 images a batch,
kappa 1, final scoring in both: seconds per image guided / unguided (goals <= 3.5x through the denoiser, <= 1.6x
through the decoder). With every step guided this is the cost ratio of one guided step; a window of w of n steps
costs (n - w + w * ratio) / n. Beside each measured ratio: the ratio of the FLOPs the step must do (counted with
FlopCounterMode, backward passes included), which no implementation beats; then those for DiT-XL/2-256 + SD VAE.
"""
import sys

import torch

from lgd_ray.config import load_config
from lgd_ray.cost import forward_backward_flops, step_costs
from lgd_ray.sampler import generate
from parts import bench_guide, interleaved, machine, priors_with_scorers, verdict

IMAGES = 32
GOALS = {"denoiser": 3.5, "decoder": 1.6}


def step_flops(prior, scorer) -> dict[str, float]:
    """FLOPs of a guided step over an unguided one (CFG pair), per path, from the models' counted FLOPs."""
    x = torch.randn(1, *prior.latent_shape)
    t, y = torch.tensor(500), torch.tensor([0])
    dit, dit_grad = forward_backward_flops(prior.transformer, lambda m, z: prior.eps(z, t, y, 1.0), x)
    head = 0.0
    img = torch.randn(1, 3 if prior.vae is not None else prior.latent_shape[0], prior.image_size, prior.image_size)
    if prior.vae is not None:
        head += forward_backward_flops(prior.vae, lambda m, z: prior.decode(z), x)[1]
    head += sum(forward_backward_flops(net, lambda m, z: m(z), img)[1] for net in (scorer.student, scorer.reference))
    return {"denoiser": (2 * dit_grad + head) / (2 * dit), "decoder": (2 * dit + head) / (2 * dit)}


def main(argv):
    steps = int(argv[0]) if argv else 10
    print(f"# measure 3: guided vs unguided cost per image ({machine()})")
    print(f"{IMAGES} images a batch, {steps} DDIM steps, CFG 4, student and reference ConvNet-3, every step guided")
    for name, prior, scorer in priors_with_scorers():
        items = [(i % prior.num_classes, i) for i in range(IMAGES)]

        def run(through):
            guide = None if through is None else bench_guide(scorer, prior.image_size, steps, through)
            return lambda: generate(prior, items, run_seed=0, stage=1, num_steps=steps, cfg_scale=4.0, batch_size=IMAGES,
                                    image_size=prior.image_size, scorer=scorer, guide=guide)

        flops = step_flops(prior, scorer)
        med = interleaved({"unguided": run(None), "denoiser": run("denoiser"), "decoder": run("decoder")}, repeats=3)
        print(f"\n{name}, {prior.image_size} px: unguided {1e3 * med['unguided'] / IMAGES:.1f} ms/image")
        for path, goal in GOALS.items():
            print(f"  guided through the {path:>8}: {1e3 * med[path] / IMAGES:7.1f} ms/image, "
                  f"{verdict(med[path] / med['unguided'], goal, higher=False)}; in FLOPs {flops[path]:.2f}x")
    c = step_costs(load_config("imagenet1k"))
    plain = 2 * c.dit_forward
    head = c.decoder_grad + c.student_grad + c.reference_grad
    print(f"\nDiT-XL/2-256 + VAE + ConvNet-6 in FLOPs (lgd_ray.cost, backward passes counted): unguided step "
          f"{plain:.0f} GFLOPs; guided through the denoiser {(2 * c.dit_grad + head) / plain:.2f}x, "
          f"through the decoder {(plain + head) / plain:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
