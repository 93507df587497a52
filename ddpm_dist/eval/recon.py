"""`python -m ddpm_dist.evaluate recon`: how well the model undoes noise. For held-out images, noise to
each chosen t, then (a) predict x0 in one step and (b) run DDIM from t back to 0; report PSNR and SSIM
(torchmetrics) per t as a table, a JSON and a plot; LPIPS when its backbone weights are on disk."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

log = logging.getLogger(__name__)


def lpips_metric():
    """torchmetrics LPIPS (AlexNet) if torchvision's AlexNet weights are already on disk; else None and why."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    have = os.path.isdir(hub) and any(f.startswith("alexnet-") for f in os.listdir(hub))
    if not have:
        return None, f"LPIPS skipped: AlexNet weights (alexnet-owt-7be5be79.pth) are not in {hub} (nothing is downloaded)"
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=False), ""


def reconstruct(model, schedule, x0: torch.Tensor, t: int, *, ddim_steps: int, prediction: str, seed: int,
                model_kwargs=None):
    """(one-step x0 prediction, DDIM reconstruction) from x_t = q_sample(x0, t)."""
    from ..diffusion.objective import q_sample, to_x0_eps
    from ..diffusion.samplers import DDIMStep

    g = torch.Generator(x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
    x_t = q_sample(schedule, x0, tt, noise)
    with torch.no_grad():
        one_step = to_x0_eps(prediction, schedule, model(x_t, tt, **(model_kwargs or {})), x_t, tt)[0].clamp(-1, 1)
        k = max(1, min(ddim_steps, t + 1))
        timesteps = sorted(set(np.round(np.linspace(0, t, k)).astype(int).tolist()))
        step = DDIMStep(model, schedule, timesteps, prediction=prediction, eta=0.0, model_kwargs=model_kwargs)
        x = x_t
        for i in reversed(range(len(timesteps))):
            x, _ = step(x, i, None)
    return one_step, x


def recon_main(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from ..data import read_all
    from ..evaluate import _run_data
    from ..eval.generate import load_setup
    from ..viz import auto_scale, grid, save_image, to_uint8

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = args.run or args.export
    if not source:
        raise ValueError("recon needs --run or --export")
    setup = load_setup(source, "ema", device)
    data = args.data or _run_data(args.run)
    if not data:
        raise ValueError("recon needs --data (a held-out shard manifest)")
    images, labels = read_all(data, limit=args.num_images)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    kwargs = {}
    if setup.num_classes:  # conditional models reconstruct with the true label
        kwargs["y"] = torch.from_numpy(np.clip(labels, 0, None)).long().to(device)
    lp, why = lpips_metric()
    ts = [int(t) for t in args.t.split(",")]
    rows, examples = [], [to_uint8(x0[:8])]
    for t in ts:
        if not 0 <= t < setup.schedule.num_steps:
            raise ValueError(f"--t {t} outside [0, {setup.schedule.num_steps})")
        one, ddim = reconstruct(setup.model, setup.schedule, x0, t, ddim_steps=args.ddim_steps,
                                prediction=setup.opts["prediction"], seed=args.seed, model_kwargs=kwargs)
        row = {"t": t}
        for name, rec in (("one_step", one), ("ddim", ddim)):
            a, b = (rec + 1) / 2, (x0 + 1) / 2
            row[f"{name}_psnr"] = float(peak_signal_noise_ratio(a, b, data_range=1.0))
            row[f"{name}_ssim"] = float(structural_similarity_index_measure(a, b, data_range=1.0))
            if lp is not None:
                rgb = (lambda z: z.repeat(1, 3, 1, 1) if z.shape[1] == 1 else z)
                row[f"{name}_lpips"] = float(lp(rgb(rec).clamp(-1, 1).cpu(), rgb(x0).cpu()))
        rows.append(row)
        examples.append(to_uint8(ddim[:8]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recon.json"), "w") as f:
        json.dump({"source": setup.desc, "data": data, "n": len(x0), "rows": rows, "lpips": why or "alex"}, f, indent=1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for name in ("one_step", "ddim"):
            ax.plot(ts, [r[f"{name}_{metric}"] for r in rows], marker="o", label=name.replace("_", "-"))
        ax.set_xlabel("noise level t")
        ax.set_title(metric.upper())
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "recon.png"), dpi=100)
    plt.close(fig)
    ex = np.concatenate(examples)
    save_image(grid(ex, nrow=min(8, len(x0)), scale=auto_scale(ex.shape[1])), os.path.join(args.out, "recon_examples.png"))
    header = f"{'t':>5} {'PSNR 1-step':>12} {'SSIM 1-step':>12} {'PSNR DDIM':>10} {'SSIM DDIM':>10}"
    print(f"reconstruction of {len(x0)} images from {data} by {setup.desc}")
    print(header)
    for r in rows:
        print(f"{r['t']:5d} {r['one_step_psnr']:12.2f} {r['one_step_ssim']:12.3f} {r['ddim_psnr']:10.2f} {r['ddim_ssim']:10.3f}")
    if why:
        print(why)
    print(f"table: {os.path.join(args.out, 'recon.json')}  plot: {os.path.join(args.out, 'recon.png')}  "
          f"examples (originals, then DDIM per t): {os.path.join(args.out, 'recon_examples.png')}")
    return 0
