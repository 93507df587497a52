"""python -m ddpm_dist.sample --run DIR | --export FILE [--num-images N --world-size W ...]

Image i comes from its own generator seeded by (seed, i): the set of images does not depend on the
number of workers, and batch b always holds images [b*B, (b+1)*B) (the last batch padded), so at a fixed
batch size they are bitwise the same for any world size on the CPU. Images are PNGs named by index,
written atomically; a re-run with the same arguments only generates what is missing.

--world-size N spawns N local workers (one per GPU, else CPU processes) unless already launched by
torchrun or SLURM, in which case their environment decides."""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .cli_common import run_cli, setup_logging
from .data import storage

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_dist.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (newest committed checkpoint)")
    src.add_argument("--export", help="export.safetensors written at the end of training")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--out", required=True, help="output folder or fsspec URL (s3://..., memory://...)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="default: the run's sample.steps (ddpm: all training steps)")
    p.add_argument("--eta", type=float, help="DDIM noise (0 = deterministic, 1 = DDPM-like)")
    p.add_argument("--spacing", choices=("uniform", "quadratic"))
    p.add_argument("--var-type", choices=("small", "large"), help="DDPM posterior variance")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--classes", default=None,
                   help="labels for class-conditional models: 'random' (default), 'none' (unconditional), or a "
                        "comma list cycled over the images (e.g. 0,1,2,3,4,5,6,7,8,9)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--world-size", type=int, default=1, help="local workers to spawn (ignored under torchrun/SLURM)")
    p.add_argument("--grid-rows", type=int, default=0, help="images per row in grid.png (0: square)")
    p.add_argument("--extras", choices=("auto", "yes", "no"), default="auto",
                   help="grid.png, trajectory.png, reverse.gif (auto: when num-images <= 1000 and --out is local)")
    p.add_argument("--npz", action="store_true", help="also write samples.npz (uint8 NHWC + labels)")
    p.add_argument("--tar", action="store_true", help="also write WebDataset shards of the images under OUT/shards")
    p.add_argument("--prometheus-port", type=int, default=0,
                   help="export ddpm_sample_* metrics on this port + local rank (0: off)")
    p.add_argument("--prometheus-addr", default="127.0.0.1")
    p.add_argument("--task", choices=("generate", "inpaint", "sr"), default="generate",
                   help="generate (default), inpaint (RePaint), sr (super-resolution with an SR-trained model)")
    p.add_argument("--sr-factor", type=int, default=2, help="sr: downsampling factor of the low-res input")
    p.add_argument("--image", help="inpaint: an image file, or a shard manifest (then --image-index picks one)")
    p.add_argument("--image-index", type=int, default=0)
    p.add_argument("--mask", default="lower-half",
                   help="inpaint: a PNG (white = keep), 'box:x0,y0,x1,y1' (the box is regenerated), 'lower-half', 'random'")
    p.add_argument("--resample", type=int, default=1, help="inpaint: RePaint resampling jumps per step")
    return p


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def existing_indices(out: str) -> set[int]:
    done = set()
    for path in storage.list_prefix(out):
        name = os.path.basename(path)
        if name.endswith(".png") and name[:-4].isdigit():
            done.add(int(name[:-4]))
    return done


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def sample_worker(args) -> None:
    """One rank's share: load the model, generate its batches, write PNGs; rank 0 finishes the extras."""
    from .eval.generate import generate_share, load_setup, plan_batches, rank_share
    from .parallel.env import barrier, init_distributed, read_env, shutdown

    env = init_distributed(read_env())
    rank, world_size, device = env.rank, env.world_size, env.device
    setup_logging(rank)
    setup = load_setup(args.run or args.export, args.weights, device, sampler=args.sampler, steps=args.steps,
                       eta=args.eta, spacing=args.spacing, var_type=args.var_type, guidance=args.guidance,
                       no_clip=args.no_clip)
    o = setup.opts
    if rank == 0:
        log.info("sampling %d images from %s: %s, %d steps, eta %.2f, guidance %.2f, %d worker(s), batch %d",
                 args.num_images, setup.desc, o["sampler"], o["steps"], o["eta"], o["guidance"], world_size,
                 args.batch_size)
        write_provenance(args, setup)
    if rank == 0 and storage.is_local(args.out) and os.path.isdir(storage.local_path(args.out)):
        for name in os.listdir(storage.local_path(args.out)):  # debris of an interrupted atomic write
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(storage.local_path(args.out), name))
    barrier()
    done = existing_indices(args.out)
    share = rank_share(plan_batches(args.num_images, args.batch_size, done), rank, world_size)
    already = len(done & set(range(args.num_images)))
    bar = tqdm(total=args.num_images, initial=already, desc="sampling", unit="img", disable=rank != 0,
               dynamic_ncols=True)
    t0, made, local_made = time.perf_counter(), 0, 0
    sink = None
    if args.prometheus_port:
        from .obs.prometheus import PrometheusSink
        sink = PrometheusSink(addr=args.prometheus_addr, port=args.prometheus_port + env.local_rank, rank=rank,
                              job=os.environ.get("SLURM_JOB_ID", "local"), run=os.path.basename(str(args.out).rstrip("/")))
        sink.world_size.set(world_size)
    for indices, images, _, fresh in generate_share(setup, share, seed=args.seed, classes=args.classes,
                                                    num_images=args.num_images):
        count = 0
        for i, img in zip(indices, images):
            if fresh and i not in done:
                storage.write_bytes_atomic(storage.join(args.out, png_name(i)), encode_png(img))
                count += 1
        local_made += count
        if sink:
            sink.sample_images.inc(count)
            sink.sample_ips.set(local_made / max(time.perf_counter() - t0, 1e-9))
        if world_size > 1:  # the bar shows the global count; every rank runs the same number of batches
            t = torch.tensor([float(count)], device=device)
            torch.distributed.all_reduce(t)
            count = int(t.item())
        made += count
        bar.update(count)
        bar.set_postfix(img_per_s=f"{made / max(time.perf_counter() - t0, 1e-9):.2f}")
    bar.close()
    if sink:
        sink.close()
    barrier()
    if rank == 0:
        _finish_outputs(args, setup)
    shutdown()


def write_provenance(args, setup) -> None:
    """OUT/sampling.json: what made these images (evaluate reads the labels and settings from it)."""
    from .eval.generate import labels_for

    info = {"source": setup.desc, "num_images": args.num_images, "seed": args.seed, "batch_size": args.batch_size,
            "classes": args.classes, "weights": args.weights, **setup.opts,
            "labels": labels_for(list(range(args.num_images)), args.classes, setup.num_classes, args.seed)}
    storage.write_bytes_atomic(storage.join(args.out, "sampling.json"), json.dumps(info).encode())


def _finish_outputs(args, setup) -> None:
    """Rank 0, after every image exists: check completeness, then grid / trajectory / GIF / npz / shards."""
    from .diffusion import TrajectoryRecorder, generate, image_seed
    from .eval.generate import labels_for
    from .viz import auto_scale, grid, save_gif, save_image, trajectory_grid

    model, schedule, shape, opts, cfg = setup.model, setup.schedule, setup.shape, setup.opts, setup.model.config
    device = next(model.parameters()).device

    missing = set(range(args.num_images)) - existing_indices(args.out)
    if missing:
        raise RuntimeError(f"{len(missing)} images missing after sampling (first {min(missing)})")
    local = storage.is_local(args.out)
    extras = args.extras == "yes" or (args.extras == "auto" and args.num_images <= 1000 and local)
    if extras or args.npz or args.tar:
        images = np.stack([np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(args.out, png_name(i))))))
                           for i in range(args.num_images)])
        if images.ndim == 3:
            images = images[..., None]
        labels = labels_for(list(range(args.num_images)), args.classes, cfg.num_classes, args.seed)
        if extras:
            n = min(len(images), 100)
            path = save_image(grid(images[:n], args.grid_rows or None, scale=auto_scale(cfg.image_size)),
                              os.path.join(storage.local_path(args.out), "grid.png"))
            log.info("grid: %s", path)
            rec = TrajectoryRecorder(record_at=None)
            k = min(8, args.num_images)
            x = generate(model, schedule, [image_seed(args.seed, i) for i in range(k)], shape, device=device,
                         labels=labels[:k] if labels else None, null_class=cfg.num_classes or None, callback=rec, **opts)
            keep = np.unique(np.linspace(0, len(rec.x_t) - 1, min(10, len(rec.x_t))).round().astype(int))
            frames = [rec.x_t[i] for i in keep] + [x.cpu()]
            out_dir = storage.local_path(args.out)
            log.info("trajectory: %s", trajectory_grid(frames, os.path.join(out_dir, "trajectory.png")))
            trajectory_grid([rec.x0[i] for i in keep] + [x.cpu()], os.path.join(out_dir, "trajectory_x0.png"))
            gif_frames = rec.x_t[:: max(1, len(rec.x_t) // 40)] + [x.cpu()]
            log.info("animation: %s", save_gif(gif_frames, os.path.join(out_dir, "reverse.gif")))
        if args.npz:
            buf = io.BytesIO()
            np.savez(buf, images=images, labels=np.array(labels if labels else [-1] * len(images)))
            storage.write_bytes_atomic(storage.join(args.out, "samples.npz"), buf.getvalue())
            log.info("npz: %s", storage.redact(storage.join(args.out, "samples.npz")))
        if args.tar:
            from .data.shards import build_shards
            src = ((f"sample{i:06d}", images[i], labels[i] if labels else None) for i in range(len(images)))
            build_shards(src, storage.join(args.out, "shards"), prefix="samples", shuffle_seed=None, overwrite=True,
                         progress=False)
    log.info("%d images in %s", args.num_images, storage.redact(args.out))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.num_images <= 0 or args.batch_size <= 0:
        raise ValueError("--num-images and --batch-size must be positive")
    if args.task == "inpaint":
        from .eval.inpaint import inpaint_main
        return inpaint_main(args)
    if args.task == "sr":
        from .eval.superres import sr_main
        return sr_main(args)
    from .parallel.env import spawn_local
    spawn_local(sample_worker, (args,), args.world_size)
    return 0


if __name__ == "__main__":
    run_cli(main)
