"""How well a model undoes noise (`python -m ddpm_dist.evaluate recon`). For held-out images, noise to
each chosen t, then (a) predict x0 in one step and (b) run DDIM from t back to 0; PSNR and SSIM
(torchmetrics) per t; LPIPS when its backbone weights are on disk."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..images import to_model_range, to_uint8

log = logging.getLogger(__name__)


def lpips_metric():
    """torchmetrics LPIPS (AlexNet) if torchvision's AlexNet weights are already on disk; else None and why."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    have = os.path.isdir(hub) and any(f.startswith("alexnet-") for f in os.listdir(hub))
    if not have:
        return (
            None,
            f"LPIPS skipped: AlexNet weights (alexnet-owt-7be5be79.pth) are not in {hub} (nothing is downloaded)",
        )
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=False), ""


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x  # LPIPS' AlexNet takes three channels


def reconstruct(
    model, schedule, x0: torch.Tensor, t: int, *, ddim_steps: int, prediction: str, seed: int, model_kwargs=None
):
    """(one-step x0 prediction, DDIM reconstruction) from x_t = q_sample(x0, t)."""
    from ..diffusion import q_sample, run_steps, to_x0_eps
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
        return one_step, run_steps(step, x_t)


def reconstruction_table(
    setup, images: np.ndarray, labels: np.ndarray, ts: list[int], *, ddim_steps: int, seed: int = 0
) -> tuple[list[dict], list[np.ndarray], str]:
    """(a row of metrics per t, example rows (originals, then the DDIM reconstruction per t), why LPIPS is
    missing or ''). `setup` is a sampling.SamplingSetup; conditional models reconstruct with the true label."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    device = setup.device
    x0 = to_model_range(images).to(device)
    kwargs = {"y": torch.from_numpy(np.clip(labels, 0, None)).long().to(device)} if setup.num_classes else {}
    lp, why = lpips_metric()
    rows, examples = [], [to_uint8(x0[:8])]
    for t in ts:
        if not 0 <= t < setup.schedule.num_steps:
            raise ValueError(f"--t {t} outside [0, {setup.schedule.num_steps})")
        one, ddim = reconstruct(
            setup.model,
            setup.schedule,
            x0,
            t,
            ddim_steps=ddim_steps,
            prediction=setup.prediction,
            seed=seed,
            model_kwargs=kwargs,
        )
        row = {"t": t}
        for name, rec in (("one_step", one), ("ddim", ddim)):
            a, b = (rec + 1) / 2, (x0 + 1) / 2
            row[f"{name}_psnr"] = float(peak_signal_noise_ratio(a, b, data_range=1.0))
            row[f"{name}_ssim"] = float(structural_similarity_index_measure(a, b, data_range=1.0))
            if lp is not None:
                row[f"{name}_lpips"] = float(lp(_rgb(rec).clamp(-1, 1).cpu(), _rgb(x0).cpu()))
        rows.append(row)
        examples.append(to_uint8(ddim[:8]))
    return rows, examples, why
