"""FLOPs per image of every preset, and what fraction of the hardware's FLOP/s a training step achieves (MFU).

1. FLOPs, counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and attention; elementwise
   ops, norms and the AdamW update are not counted, as usual for MFU): per training image (forward + backward
   of diffusion_loss, the model's forward + backward) and per sampling step (one forward, no grad, one image;
   classifier-free guidance doubles it). Counted at batch 1 and 2, which must agree exactly per image. A
   brute-force check from layer shapes (2*Cin*Cout*k*k*H*W per Conv2d, 2*in*out per Linear, 4*L*L*C per
   attention) is printed beside the counted forward.
2. The reference FLOP/s in the training dtype (fp32, or bf16 with --bf16): on the CPU, this machine's measured
   dense matmul (best of torch.matmul of 2048x2048 timed 10 times first and 3 more after every round of
   training steps, torch's own thread count); on a GPU, the device's datasheet dense peak (PEAK_TFLOPS, or
   --peak-tflops), the measured matmul (8192x8192) when the device is not listed.
3. MFU of a training step (forward, diffusion loss, backward, AdamW step) at --batch for --presets:
   counted model FLOPs per image x batch / best step time / reference FLOP/s (best-of on both sides, as the
   least disturbed estimate on a shared machine; the median step is printed too); eager, and with --compile
   also torch.compile(model), steps alternating with eager's (compile time = first step - median step).

    .venv/bin/python bench/flops.py [--presets digits,ddpm-cifar10] [--batch 16] [--steps 5] [--compile] [--bf16]
                                    [--device cpu|cuda] [--peak-tflops T] [--threads N] [--table-presets all]
                                    [--skip-table] [--skip-mfu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_dist.diffusion import diffusion_loss, make_schedule  # noqa: E402
from ddpm_dist.models import PRESETS, build_model, count_parameters  # noqa: E402

# Dense (no structured sparsity) peak FLOP/s in TFLOP/s, NVIDIA datasheet values. fp32 is the non-tensor-core
# rate, which is what fp32 matmuls get with torch's default (TF32 off). H200 has the H100 SXM's compute.
# Matched against torch.cuda.get_device_name(); H100 PCIe / NVL parts are slower and not listed (measured instead).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp32": 67.0},  # H100 SXM
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}

# torch's counter has no formula for the CPU flash-attention kernel, which SDPA picks on the CPU for
# last-dim-contiguous q/k/v; without these, attention would count 0 FLOPs there. Same arithmetic as the CUDA
# kernels' formulas (the backward recomputes the scores). Our UNet's q/k/v are transposed views, so today SDPA
# takes the math path on the CPU (bmm, counted by torch itself); this keeps the count right if that changes.
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, out_shape=None, **kw: (
        sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad_out, q, k, v)
    ),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(cfg, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x0.to(device), t.to(device), noise.to(device), (y.to(device) if y is not None else None)


def count_flops(model, schedule, batch, device, train: bool) -> int:
    x0, t, noise, y = make_batch(model.config, batch, device)
    model.train(train)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        if train:
            diffusion_loss(model, schedule, x0, t, noise, model_kwargs={"y": y}).backward()
        else:
            with torch.no_grad():
                model(x0, t, y=y)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def brute_force_forward(model, device) -> tuple[int, int]:
    """(conv FLOPs, conv + linear + attention FLOPs) of one image's forward, from the layers' shapes."""
    conv, other = [0], [0]

    def conv_hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        conv[0] += 2 * (m.in_channels // m.groups) * m.out_channels * k * out.shape[2] * out.shape[3]

    def linear_hook(m, inp, out):
        other[0] += 2 * m.in_features * m.out_features

    def attention_hook(m, inp, out):
        _, c, h, w = inp[0].shape
        other[0] += 4 * (h * w) ** 2 * c  # q k^T and (softmax) v, over all heads together

    from ddpm_dist.models.unet import Attention

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attention_hook))
    x0, t, _, y = make_batch(model.config, 1, device)
    model.eval()
    with torch.no_grad():
        model(x0, t, y=y)
    for h in hooks:
        h.remove()
    return conv[0], conv[0] + other[0]


def flop_table(presets, device):
    schedule = make_schedule("linear", 1000)  # gather() moves its values to the timesteps' device
    print(f"FLOPs per image (FlopCounterMode, counted at batch 1 and 2 on {device.type}):")
    print(
        f"  {'preset':13s} {'params':>8s} {'GFLOPs/train image':>19s} {'GFLOPs/sampling step':>21s} "
        f"{'train/fwd':>9s} {'linear':>6s} {'conv/fwd':>8s} {'shapes/fwd':>10s}"
    )
    per_image = {}
    for name in presets:
        torch.manual_seed(0)
        model = build_model(name).to(device)
        train = [count_flops(model, schedule, b, device, True) for b in (1, 2)]
        fwd = [count_flops(model, schedule, b, device, False) for b in (1, 2)]
        linear = train[1] == 2 * train[0] and fwd[1] == 2 * fwd[0]
        conv, analytic = brute_force_forward(model, device)
        per_image[name] = train[1] / 2
        print(
            f"  {name:13s} {count_parameters(model) / 1e6:7.2f}M {train[1] / 2e9:19.3f} {fwd[1] / 2e9:21.3f} "
            f"{train[1] / fwd[1]:9.3f} {'exact' if linear else 'NO':>6s} {conv / (fwd[1] / 2):8.4f} "
            f"{analytic / (fwd[1] / 2):10.4f}",
            flush=True,
        )
        del model
    print(
        "  train/fwd: training over sampling FLOPs (3 would be forward + 2x forward for the backward; the first conv "
        "needs no input gradient).\n  conv/fwd, shapes/fwd: brute-force sum over Conv2d layers of 2*Cin*Cout*k*k*H*W "
        "(and + Linear + attention) over the counted forward."
    )
    return per_image


class Matmul:
    """Dense matmul FLOP/s in the training dtype: the best of every timed torch.matmul of size x size so far.
    Sampled again between training steps, so a burst of load from a neighbour at the start does not set it."""

    def __init__(self, device, dtype, size):
        self.device, self.size, self.best, self.reps = device, size, float("inf"), 0
        self.a = torch.randn(size, size, device=device).to(dtype)
        self.b = torch.randn(size, size, device=device).to(dtype)
        torch.matmul(self.a, self.b)
        sync(device)

    def sample(self, reps=3):
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(self.a, self.b)
            sync(self.device)
            self.best = min(self.best, time.perf_counter() - t0)
        self.reps += reps

    @property
    def flops(self):
        return 2 * self.size**3 / self.best


def reference(device, key, measured, args) -> tuple[float, str]:
    """(FLOP/s that MFU divides by, where it comes from)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, peaks in PEAK_TFLOPS.items():
            if part in name and not (part == "H100" and ("PCIe" in name or "NVL" in name)):
                return peaks[key] * 1e12, f"{name} datasheet dense {key}"
        return measured, f"{name} is not in PEAK_TFLOPS: the measured matmul"
    return measured, "the measured matmul"


def time_training(name, batch, steps, device, bf16, modes, between=lambda: None):
    """Per mode (eager / compiled): (best step seconds, median step seconds, first-call seconds). The modes'
    steps alternate (one step of each per round, order flipped every round), so both see the same load;
    `between` runs after every round."""
    schedule = make_schedule("linear", 1000)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    runs = {}
    for mode in modes:
        torch.manual_seed(0)
        model = build_model(name).to(device).train()
        runs[mode] = dict(
            model=model,
            fn=torch.compile(model) if mode == "compiled" else model,
            opt=torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True),
            times=[],
        )
    data = [make_batch(runs[modes[0]]["model"].config, batch, device, seed=s) for s in range(2)]

    def step(run, i):
        x0, t, noise, y = data[i % 2]
        sync(device)
        t0 = time.perf_counter()
        with amp():
            loss = diffusion_loss(run["fn"], schedule, x0, t, noise, model_kwargs={"y": y})
        loss.backward()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        sync(device)
        run["times"].append(time.perf_counter() - t0)

    for i in range(steps + 2):  # two warm-up steps each (the first one compiles)
        for mode in modes if i % 2 else modes[::-1]:
            step(runs[mode], i)
        between()
    return {mode: (min(r["times"][2:]), statistics.median(r["times"][2:]), r["times"][0]) for mode, r in runs.items()}


def mfu(args, per_image, device):
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    key = "bf16" if args.bf16 else "fp32"
    matmul = Matmul(device, dtype, args.matmul_size or (8192 if device.type == "cuda" else 2048))
    matmul.sample(10)
    modes = ("eager", "compiled") if args.compile else ("eager",)
    rows = []
    for name in args.presets:
        if name not in per_image:
            torch.manual_seed(0)
            model = build_model(name).to(device)
            per_image[name] = count_flops(model, make_schedule("linear", 1000), 2, device, True) / 2
            del model
        results = time_training(name, args.batch, args.steps, device, args.bf16, modes, between=matmul.sample)
        rows += [(name, mode, *r) for mode, r in results.items()]
        print(f"  timed {name} ({', '.join(modes)})", flush=True)
    ref, where = reference(device, key, matmul.flops, args)
    print(
        f"\nmatmul: {matmul.flops / 1e9:,.1f} GFLOP/s measured ({matmul.size}x{matmul.size} {key}, best of "
        f"{matmul.reps} spread over the run, {torch.get_num_threads()} threads); MFU reference: {ref / 1e9:,.1f} "
        f"GFLOP/s ({where})"
    )
    print(
        f"training step (forward, loss, backward, AdamW), batch {args.batch}, {args.steps} steps after 2 warm-up"
        f"{', eager and compiled alternating' if args.compile else ''}, {'bf16 autocast' if args.bf16 else 'fp32'}; "
        f"MFU from the best step (like the matmul):"
    )
    print(
        f"  {'preset':13s} {'mode':8s} {'best ms':>9s} {'median ms':>9s} {'img/s':>8s} {'GFLOP/s':>8s} {'MFU':>7s} "
        f"{'of matmul':>9s} {'compile s':>9s}"
    )
    for name, mode, best, median, first in rows:
        achieved = per_image[name] * args.batch / best
        comp = f"{first - median:9.1f}" if mode == "compiled" else f"{'':9s}"
        print(
            f"  {name:13s} {mode:8s} {best * 1e3:9.1f} {median * 1e3:9.1f} {args.batch / best:8.1f} "
            f"{achieved / 1e9:8.1f} {achieved / ref:7.1%} {achieved / matmul.flops:9.1%} {comp}",
            flush=True,
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="digits,ddpm-cifar10", help="presets whose training step is timed")
    p.add_argument("--table-presets", default="all", help="presets in the FLOP table (comma list or 'all')")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) (minutes on 2 CPU cores)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the step, bf16 for the matmul reference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--peak-tflops", type=float, default=None, help="override the reference peak (TFLOP/s)")
    p.add_argument("--matmul-size", type=int, default=None, help="default 2048 on the CPU, 8192 on a GPU")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--skip-mfu", action="store_true")
    args = p.parse_args()
    args.presets = [s for s in args.presets.split(",") if s]
    table = list(PRESETS) if args.table_presets == "all" else [s for s in args.table_presets.split(",") if s]
    for name in args.presets + table:
        if name not in PRESETS:
            p.error(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {device.type}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus"
    )
    per_image = {} if args.skip_table else flop_table(table, device)
    if not args.skip_mfu:
        mfu(args, per_image, device)
