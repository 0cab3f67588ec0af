"""Measure 6: the cost of ImageNet-1K IPC 50 with DiT-XL/2-256 on H100s, on paper, against `distill --dry-run`.

    python bench/cost_model.py [--gpu-tflops 495] [--utilisation 0.3]

The paper side uses only published numbers and hand counts (FLOPs = 2 x multiply-adds): DiT-XL/2 at 256 px is
118.6 GFLOPs (multiply-adds) a forward in the DiT paper (Table 4); the SD VAE decoder and ConvNet-6 are counted layer
by layer below (convolutions and attention matmuls; norms and activations left out). Backward passes:
- guidance differentiates frozen models to their input: a weight matmul or convolution needs one more of the same
  size (the input gradient), an attention matmul (both operands activations) two, so backward = forward + attention;
- a training step also needs the weight gradients: backward = 2 x forward, less the first layer's input gradient.
The dry-run side is lgd_ray.cost on configs/imagenet1k.yaml (FlopCounterMode on the models built on the meta device).
"""
import argparse

from lgd_ray.config import load_config
from lgd_ray.cost import run_cost

DIT_XL_2_MACS = 118.6e9  # DiT paper, Table 4: DiT-XL/2, 256 x 256


def conv(h: int, cin: int, cout: int, k: int = 3) -> float:
    """Multiply-adds of a k x k convolution producing an h x h map."""
    return h * h * cin * cout * k * k


def attention(tokens: int, dim: int) -> float:
    """Multiply-adds of QK^T and AV (the projections are weight matmuls, counted with the layers)."""
    return 2 * tokens * tokens * dim


DIT_XL_2_ATTENTION = 28 * attention(256, 1152)  # 28 blocks, 16 x 16 patches of 2 x 2 on a 32 x 32 latent, width 1152
SD_DECODER_ATTENTION = attention(32 * 32, 512)  # one attention block in the mid block, at 32 x 32


def sd_vae_decoder_macs() -> float:
    """The SD VAE decoder (block_out_channels 128, 256, 512, 512; 3 resnets per up block) from a 4 x 32 x 32 latent."""
    macs = conv(32, 4, 512)  # conv_in
    macs += 4 * conv(32, 512, 512)  # mid block: 2 resnets of 2 convs
    macs += 4 * 1024 * 512 * 512 + SD_DECODER_ATTENTION  # mid attention: q, k, v, out projections; QK^T and AV
    h, cin = 32, 512
    for cout, upsample in ((512, True), (512, True), (256, True), (128, False)):
        macs += conv(h, cin, cout) + conv(h, cout, cout) + (conv(h, cin, cout, 1) if cin != cout else 0)  # resnet 1
        macs += 4 * conv(h, cout, cout)  # resnets 2 and 3
        if upsample:
            h *= 2
            macs += conv(h, cout, cout)  # nearest x2 then a 3x3 conv
        cin = cout
    return macs + conv(256, 128, 3)  # conv_out


def convnet_macs(depth: int, size: int, channels: int = 3, width: int = 128, classes: int = 1000) -> float:
    """ConvNet-D: depth x (conv3x3 -> norm -> ReLU -> avgpool 2), then a linear head."""
    macs, h, cin = 0.0, size, channels
    for _ in range(depth):
        macs += conv(h, cin, width)
        h, cin = h // 2, width
    return macs + width * h * h * classes


def paper_plan(classes=1000, seed_ipc=10, ipc_per_stage=10, stages=4, steps=50, window=(10, 45), kappa=3,
               student_epochs=300, gamma=50.0) -> dict:
    """FLOPs of every stage of LGD on ImageNet-1K (configs/imagenet1k.yaml's settings), through the denoiser."""
    dit, dec, cls = 2 * DIT_XL_2_MACS, 2 * sd_vae_decoder_macs(), 2 * convnet_macs(6, 128)
    dit_grad = 2 * dit + 2 * DIT_XL_2_ATTENTION  # forward + backward to the input
    dec_grad, cls_grad = 2 * dec + 2 * SD_DECODER_ATTENTION, 2 * cls
    cls_train = 3 * cls - 2 * conv(128, 3, 128)  # no gradient for the images themselves
    unguided = 2 * dit  # classifier-free guidance: the conditional and the null-class forward
    guided = 2 * dit_grad + dec_grad + 2 * cls_grad  # the CFG pair, decoder, student and reference, each with backward
    # deviation guidance (gamma > 0), from stage 1 on: the CFG pair's backward for g_D's cotangent too
    deviation = 2 * (dit_grad - dit) if gamma else 0.0
    score = dec + 2 * cls  # every candidate's final image is decoded and scored once
    w = window[1] - window[0] + 1
    rows, images = [], 0
    for s in range(stages + 1):
        n = classes * (seed_ipc if s == 0 else ipc_per_stage)
        images += n
        traj = n * (1 if s == 0 else kappa)
        g_steps = 0 if s == 0 else traj * w
        sample = (traj * steps - g_steps) * unguided + g_steps * (guided + deviation) + traj * score
        rows.append({"stage": s, "sample": sample, "train": cls_train * images * student_epochs})
    return {"dit": dit, "dit_grad": dit_grad, "decoder": dec, "decoder_grad": dec_grad, "classifier": cls,
            "classifier_train": cls_train, "unguided": unguided, "guided": guided, "deviation": deviation, "window": w,
            "stages": rows,
            "total": sum(r["sample"] + r["train"] for r in rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-tflops", type=float, default=495.0, help="peak: H100 SXM dense TF32 (the prior runs in fp32)")
    ap.add_argument("--utilisation", type=float, default=0.3)
    args = ap.parse_args()
    paper, dry = paper_plan(), run_cost(load_config("imagenet1k"))
    c = dry["costs"]
    rate = args.gpu_tflops * 1e12 * args.utilisation
    print("# measure 6: ImageNet-1K IPC 50, DiT-XL/2-256, on paper vs `distill imagenet1k --dry-run` (GFLOPs per image)")
    rows = [("DiT forward", paper["dit"], c["dit_forward"] * 1e9),
            ("DiT forward + backward to input", paper["dit_grad"], c["dit_grad"] * 1e9),
            ("VAE decoder", paper["decoder"], c["decoder"] * 1e9),
            ("VAE decoder + backward to input", paper["decoder_grad"], c["decoder_grad"] * 1e9),
            ("ConvNet-6 at 128 px", paper["classifier"], c["student"] * 1e9),
            ("ConvNet-6 training step", paper["classifier_train"], c["student_train"] * 1e9),
            ("unguided step (CFG pair)", paper["unguided"], dry["unguided_step_gflops"] * 1e9),
            ("guided step (denoiser path)", paper["guided"], dry["guided_step_gflops"] * 1e9),
            ("+ deviation guidance (gamma 50)", paper["deviation"], dry["deviation_step_gflops"] * 1e9)]
    for s_p, s_d in zip(paper["stages"], dry["stages"]):
        rows += [(f"stage {s_p['stage']} sampling (PFLOPs)", s_p["sample"] / 1e6, s_d["sample_flops"] / 1e6),
                 (f"stage {s_p['stage']} student training (PFLOPs)", s_p["train"] / 1e6, s_d["train_flops"] / 1e6)]
    rows.append(("total (PFLOPs)", paper["total"] / 1e6, dry["total_flops"] / 1e6))
    print(f"{'':<36} {'paper':>12} {'dry-run':>12} {'dry/paper':>10}")
    for name, p, d in rows:
        print(f"{name:<36} {p / 1e9:>12.1f} {d / 1e9:>12.1f} {d / p:>10.4f}")
    hours = paper["total"] / rate / 3600
    print(f"\nGPU-hours at {args.gpu_tflops:.0f} TFLOPS x {args.utilisation:.0%}: paper {hours:.1f}, dry-run "
          f"{dry['total_flops'] / rate / 3600:.1f}")
    chunks = dry["chunks"]
    train_share = sum(r["train"] for r in paper["stages"]) / paper["total"]
    print(f"wall hours with G GPUs (sampling splits over {chunks} class chunks; student training, "
          f"{train_share:.1%} of the FLOPs, assumed to scale the same):")
    for g in (1, 8, 32, 64, 128):
        print(f"  G = {g:>3}: {hours / min(g, chunks):6.2f} h" + ("  (capped: one chunk per actor)" if g > chunks else ""))


if __name__ == "__main__":
    main()
