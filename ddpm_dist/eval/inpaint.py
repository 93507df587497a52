"""Inpainting with any trained model (RePaint, Lugmayr et al. 2022): after every reverse step the known
region is replaced by the original noised to the new step's level; with --resample R each step is
redone R times, re-noising the merged image back one step in between, so the hole harmonises with
what is kept. Works with the DDPM and DDIM step rules alike."""
from __future__ import annotations

import io
import logging
import os

import numpy as np
import torch
from PIL import Image

from ..diffusion.objective import q_sample
from ..diffusion.samplers import STEPS, StackedRandomGenerator, make_timesteps

log = logging.getLogger(__name__)


def renoise(schedule, x_s, s: int, t: int, rng) -> torch.Tensor:
    """A draw from q(x_t | x_s) for t > s: N(sqrt(abar_t / abar_s) x_s, (1 - abar_t / abar_s) I)."""
    a = schedule.alphas_cumprod
    ratio = (a[t] / a[s]).item()
    return ratio**0.5 * x_s + (1 - ratio) ** 0.5 * rng.randn_like(x_s)


def inpaint(model, schedule, known: torch.Tensor, keep: torch.Tensor, *, seeds, sampler="ddpm", steps=None, eta=None,
            resample=1, prediction="eps", clip_x0=True, model_kwargs=None, callback=None) -> torch.Tensor:
    """known: images in [-1, 1] (N,C,H,W); keep: 1 where the pixel is known, 0 in the hole (N or 1,1,H,W)."""
    steps = steps or (schedule.num_steps if sampler == "ddpm" else 50)
    eta = (1.0 if sampler == "ddpm" else 0.0) if eta is None else eta
    timesteps = make_timesteps(schedule.num_steps, steps)
    rng = StackedRandomGenerator(known.device, seeds)
    step = STEPS[sampler](model, schedule, timesteps, prediction=prediction, eta=eta, clip_x0=clip_x0,
                          model_kwargs=model_kwargs)
    keep = keep.to(known.dtype)

    def known_at(i_next: int) -> torch.Tensor:
        if i_next < 0:
            return known
        t = torch.full((known.shape[0],), timesteps[i_next], device=known.device, dtype=torch.long)
        return q_sample(schedule, known, t, rng.randn_like(known))

    x = rng.randn(known.shape)
    x = keep * known_at(len(timesteps) - 1) + (1 - keep) * x
    with torch.no_grad():
        for i in reversed(range(len(timesteps))):
            for r in range(resample):
                x_next, x0 = step(x, i, rng)
                x_next = keep * known_at(i - 1) + (1 - keep) * x_next
                if r < resample - 1 and i > 0:  # RePaint: go back up one step and redo it
                    x = renoise(schedule, x_next, timesteps[i - 1], timesteps[i], rng)
            if callback:
                callback(i, timesteps[i], x, x0)
            x = x_next
    return x


def make_mask(spec: str, size: int, seed: int = 0) -> np.ndarray:
    """1 = keep, 0 = regenerate. 'lower-half', 'box:x0,y0,x1,y1' (the box is regenerated), 'random'
    (strokes and boxes from the seed), or a PNG path (white = keep)."""
    keep = np.ones((size, size), dtype=np.float32)
    if spec == "lower-half":
        keep[size // 2:] = 0
    elif spec.startswith("box:"):
        try:
            x0, y0, x1, y1 = (int(v) for v in spec[4:].split(","))
        except ValueError:
            raise ValueError(f"--mask '{spec}': expected box:x0,y0,x1,y1") from None
        keep[y0:y1, x0:x1] = 0
    elif spec == "random":
        rng = np.random.default_rng(seed)
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(size // 6, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            keep[y:y + h, x:x + w] = 0
        for _ in range(rng.integers(1, 3)):  # a random walk stroke
            x, y = rng.integers(0, size, 2)
            for _ in range(size):
                keep[max(0, y - 1):y + 1, max(0, x - 1):x + 1] = 0
                x = int(np.clip(x + rng.integers(-1, 2), 0, size - 1))
                y = int(np.clip(y + rng.integers(-1, 2), 0, size - 1))
    else:
        if not os.path.exists(spec):
            raise FileNotFoundError(f"mask '{spec}' is not a file, 'lower-half', 'box:x0,y0,x1,y1' or 'random'")
        with Image.open(spec) as im:
            keep = (np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127).astype(np.float32)
    return keep


def load_image(path: str, index: int, size: int, channels: int) -> tuple[np.ndarray, int]:
    """uint8 HWC from an image file, or sample `index` of a shard manifest (with its label)."""
    if path.endswith(".json"):
        from ..data import read_all
        images, labels = read_all(path, limit=index + 1)
        return images[index], int(labels[index])
    if not os.path.exists(path):
        raise FileNotFoundError(f"image '{path}' does not exist")
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(im)
    return (arr[..., None] if arr.ndim == 2 else arr), -1


def inpaint_main(args) -> int:
    """`python -m ddpm_dist.sample --task inpaint ...`: N completions of one image, and a picture."""
    from ..eval.generate import load_setup
    from ..viz import auto_scale, grid, save_image, to_uint8

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = load_setup(args.run or args.export, args.weights, device, sampler=args.sampler or "ddpm",
                       steps=args.steps, eta=args.eta)
    cfg = setup.model.config
    if not args.image:
        raise ValueError("--task inpaint needs --image (a file, or a shard manifest with --image-index)")
    img, label = load_image(args.image, args.image_index, cfg.image_size, cfg.in_channels)
    keep = torch.from_numpy(make_mask(args.mask, cfg.image_size, args.seed))[None, None].to(device)
    n = args.num_images
    known = torch.from_numpy(img).permute(2, 0, 1).float().div(127.5).sub(1)[None].repeat(n, 1, 1, 1).to(device)
    kwargs = {}
    if cfg.num_classes:
        kwargs["y"] = torch.full((n,), label if label >= 0 else cfg.num_classes, device=device, dtype=torch.long)
    from ..diffusion.samplers import image_seed
    out = inpaint(setup.model, setup.schedule, known, keep, seeds=[image_seed(args.seed, i) for i in range(n)],
                  sampler=setup.opts["sampler"], steps=setup.opts["steps"], eta=setup.opts["eta"],
                  resample=args.resample, prediction=setup.opts["prediction"], model_kwargs=kwargs)
    results = to_uint8(out)
    original = img[None]
    masked = (original * keep.cpu().numpy()[0, 0][..., None]).astype(np.uint8)
    os.makedirs(args.out, exist_ok=True)
    row = np.concatenate([original, masked, results])
    path = save_image(grid(row, nrow=len(row), scale=auto_scale(cfg.image_size)), os.path.join(args.out, "inpaint.png"))
    from ..data import storage
    for i, r in enumerate(results):
        buf = io.BytesIO()
        Image.fromarray(r[..., 0] if r.shape[2] == 1 else r).save(buf, format="PNG")
        storage.write_bytes_atomic(os.path.join(args.out, f"{i:06d}.png"), buf.getvalue())
    print(f"inpainting: original | masked | {n} completions -> {path}")
    return 0
