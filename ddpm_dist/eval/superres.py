"""`python -m ddpm_dist.sample --task sr`: super-resolve an image (or a shard sample) with a model trained
with train.sr_factor (SR3-style: the bicubic-upsampled low-res image as extra input channels)."""
from __future__ import annotations

import os

import numpy as np
import torch

from ..data.degrade import lowres, upsample_condition


def sr_main(args) -> int:
    from ..diffusion import generate, image_seed
    from ..eval.generate import load_setup
    from ..eval.inpaint import load_image
    from ..training.export import load_for_sampling
    from ..viz import auto_scale, grid, save_image, to_uint8

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = load_setup(args.run or args.export, args.weights, device, sampler=args.sampler, steps=args.steps,
                       eta=args.eta)
    cfg = setup.model.config
    if not cfg.cond_channels:
        raise ValueError("this model has no conditioning channels: train it with train.sr_factor and model.cond_channels")
    _, _, run_sample, _ = load_for_sampling(args.run or args.export, args.weights)
    factor = args.sr_factor
    if not args.image:
        raise ValueError("--task sr needs --image (a file, or a shard manifest with --image-index)")
    img, _ = load_image(args.image, args.image_index, cfg.image_size, cfg.in_channels)
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(127.5).sub(1)[None].to(device)
    low = lowres(x, factor)
    cond = upsample_condition(low, cfg.image_size)
    n = args.num_images
    out = generate(setup.model, setup.schedule, [image_seed(args.seed, i) for i in range(n)],
                   (cfg.in_channels, cfg.image_size, cfg.image_size), device=device,
                   model_kwargs={"cond": cond.repeat(n, 1, 1, 1)}, **{**setup.opts, "guidance": 1.0})
    nearest = torch.nn.functional.interpolate(low, size=cfg.image_size, mode="nearest")
    row = np.concatenate([to_uint8(nearest), to_uint8(cond), to_uint8(out), to_uint8(x)])
    os.makedirs(args.out, exist_ok=True)
    path = save_image(grid(row, nrow=len(row), scale=auto_scale(cfg.image_size)), os.path.join(args.out, "superres.png"))
    err = (out - x).abs().mean().item() * 127.5
    print(f"super-resolution x{factor}: low-res | bicubic | {n} samples | original -> {path} "
          f"(mean abs error {err:.1f}/255; bicubic {(cond - x).abs().mean().item() * 127.5:.1f}/255)")
    return 0
