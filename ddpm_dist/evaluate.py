"""python -m ddpm_dist.evaluate fid|frechet|ref-stats|recon ...

fid        Fréchet Inception Distance with clean-fid's Inception ("clean" resize) from a local file
           (--inception PATH or $DDPM_INCEPTION); images from --samples (PNG folder / URL) or generated
           in memory from --run/--export; reference statistics from --ref (.npz) or --data (shards).
frechet    the same with the digits classifier's features (for the embedded digits when there is no
           Inception file): a Fréchet distance, not an FID, plus the class accuracy of conditional samples.
ref-stats  reference statistics of a shard set, saved with the extractor's checksum and resize mode.
recon      PSNR / SSIM of one-step x0 predictions and DDIM reconstructions from chosen noise levels."""
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
    p = argparse.ArgumentParser(prog="python -m ddpm_dist.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("fid", "frechet"):
        f = sub.add_parser(name, help="Fréchet distance of samples to reference statistics")
        src = f.add_mutually_exclusive_group(required=True)
        src.add_argument("--samples", help="folder/URL of PNGs named by index (from ddpm_dist.sample)")
        src.add_argument("--run", help="generate in memory from a run directory (no PNG round trip)")
        src.add_argument("--export", help="generate in memory from an export.safetensors")
        f.add_argument("--ref", help="reference statistics .npz (from ref-stats)")
        f.add_argument("--data", help="shard manifest to compute reference statistics from (default for frechet: "
                                      "the run's training data)")
        f.add_argument("--num-images", type=int, default=None, help="with --run/--export: how many to generate")
        f.add_argument("--batch-size", type=int, default=64)
        f.add_argument("--seed", type=int, default=0)
        f.add_argument("--sampler", choices=("ddpm", "ddim"))
        f.add_argument("--steps", type=int)
        f.add_argument("--eta", type=float)
        f.add_argument("--guidance", type=float)
        f.add_argument("--classes", default=None, help="as for ddpm_dist.sample (default random)")
        f.add_argument("--world-size", type=int, default=1, help="local workers to spawn (ignored under torchrun/SLURM)")
        f.add_argument("--inception", help="path to inception-2015-12-05.pt (fid)")
        f.add_argument("--out", help="result JSON (default: next to the samples or in the run directory)")
    r = sub.add_parser("ref-stats", help="reference feature statistics of a shard set")
    r.add_argument("--data", required=True, help="shard manifest URL")
    r.add_argument("--out", required=True, help="output .npz (path or fsspec URL)")
    r.add_argument("--extractor", choices=("inception", "digits"), default="inception")
    r.add_argument("--inception", help="path to inception-2015-12-05.pt")
    r.add_argument("--batch-size", type=int, default=64)
    c = sub.add_parser("recon", help="reconstruction PSNR/SSIM per noise level")
    c.add_argument("--run", help="run directory")
    c.add_argument("--export", help="export.safetensors")
    c.add_argument("--data", help="held-out shard manifest (default: the run's training data)")
    c.add_argument("--num-images", type=int, default=64)
    c.add_argument("--t", default="50,100,250,500,750", help="comma list of timesteps")
    c.add_argument("--ddim-steps", type=int, default=20, help="DDIM steps from t back to 0")
    c.add_argument("--out", required=True, help="output folder (recon.json, recon.png, examples)")
    c.add_argument("--seed", type=int, default=0)
    return p


def make_extractor(kind: str, args, device, data: str | None):
    from .eval.fid import inception_extractor

    if kind == "fid" or kind == "inception":
        return inception_extractor(getattr(args, "inception", None), device)
    if not data:
        raise ValueError("frechet needs --data (a labelled shard manifest) to train/load the digits classifier")
    from .eval.digits_classifier import digits_extractor
    return digits_extractor(data, device)[0]


def reference_stats(args, extractor, data: str | None, device):
    from .eval.fid import RefStats

    if args.ref:
        ref = RefStats.load(args.ref)
        ref.check(extractor)
        return ref
    if not data:
        raise ValueError("give --ref (statistics .npz) or --data (shard manifest)")
    return compute_ref_stats(data, extractor, args.batch_size)


def compute_ref_stats(data: str, extractor, batch_size: int):
    from .data import load_manifest, read_all
    from .eval.fid import RefStats, accumulate

    m = load_manifest(data)
    images, _ = read_all(data)
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    stats = accumulate(extractor, tqdm(batches, total=-(-len(images) // batch_size), desc="reference features", unit="batch"))
    mu, sigma = stats.mean_cov()
    return RefStats(mu, sigma, stats.n, extractor.name, extractor.checksum, extractor.resize_mode, m.checksum())


def _run_data(run: str | None) -> str | None:
    if run and os.path.exists(os.path.join(run, "config.yaml")):
        import yaml
        with open(os.path.join(run, "config.yaml")) as f:
            return yaml.safe_load(f).get("data", {}).get("source")
    return None


def frechet_worker(args) -> None:
    """Every rank: features of its own images into float64 sums; all-reduce; rank 0 scores and writes."""
    from .eval.fid import FeatureStats, accumulate, frechet_distance
    from .parallel.env import init_distributed, read_env, shutdown

    env = init_distributed(read_env())
    setup_logging(env.rank)
    rank, world, device = env.rank, env.world_size, env.device
    prov = _provenance(args)
    data = args.data or (_run_data(args.run) if args.run else None) or _run_data(_run_from_provenance(prov))
    extractor = make_extractor(args.cmd, args, device, data)
    t0 = time.perf_counter()
    labels, preds = [], []
    classifier = None
    if args.cmd == "frechet":
        from .eval.digits_classifier import digits_extractor
        classifier = digits_extractor(data, device)[1]

    def observe(images, batch_labels):
        if classifier is not None and batch_labels is not None:
            with torch.no_grad():
                logits = classifier(torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device))
            preds.extend(logits.argmax(1).cpu().tolist())
            labels.extend(batch_labels)

    if args.samples:
        indices = _sample_indices(args.samples)
        mine = indices[rank::world]
        prov_labels = prov.get("labels")

        def batches():
            for i in range(0, len(mine), args.batch_size):
                idx = mine[i:i + args.batch_size]
                imgs = np.stack([_read_png(args.samples, k) for k in idx])
                observe(imgs, [prov_labels[k] for k in idx] if prov_labels else None)
                yield imgs
        n_total = len(indices)
        probe = _read_png(args.samples, indices[0])
    else:
        from .eval.generate import generate_share, load_setup, plan_batches, rank_share
        setup = load_setup(args.run or args.export, "ema", device, sampler=args.sampler, steps=args.steps, eta=args.eta,
                           guidance=args.guidance)
        prov = {"source": setup.desc, **setup.opts, "seed": args.seed, "classes": args.classes}
        n_total = args.num_images or 1000
        share = rank_share(plan_batches(n_total, args.batch_size, set()), rank, world)
        c, h, w = setup.shape
        probe = np.zeros((h, w, c), dtype=np.uint8)

        def batches():
            for idx, imgs, lab, fresh in generate_share(setup, share, seed=args.seed, classes=args.classes,
                                                        num_images=n_total):
                if fresh:  # repeats that even out model calls are not counted twice
                    observe(imgs, lab)
                    yield imgs
    bar = tqdm(total=n_total, desc="features", unit="img", disable=rank != 0)
    dim = extractor.features(probe[None]).shape[1]  # ranks without images still join the all-reduce
    stats = accumulate(extractor, batches(), FeatureStats(dim), on_batch=lambda n: bar.update(n * world))
    bar.close()
    stats.all_reduce(device)
    acc = _all_reduce_accuracy(preds, labels, device)
    ref = reference_stats(args, extractor, data, device) if rank == 0 else None
    if rank == 0:
        mu, sigma = stats.mean_cov()
        value = frechet_distance(mu, sigma, ref.mu, ref.sigma)
        kind = "FID" if args.cmd == "fid" else "Frechet distance (digits classifier features, not FID)"
        result = {"metric": kind, "value": value, "n": stats.n, "ref_n": ref.n, "extractor": extractor.name,
                  "extractor_checksum": extractor.checksum, "resize_mode": extractor.resize_mode,
                  "class_accuracy": acc, "seconds": time.perf_counter() - t0,
                  **{k: prov.get(k) for k in ("source", "sampler", "steps", "eta", "guidance", "seed", "classes")}}
        out = args.out or storage.join(args.samples or args.run or os.path.dirname(args.export),
                                       "fid.json" if args.cmd == "fid" else "frechet.json")
        storage.write_bytes_atomic(out, json.dumps(result, indent=1).encode())
        acc_text = f", class accuracy {acc:.3f}" if acc is not None else ""
        print(f"{kind}: {value:.4f} over {stats.n} images vs {ref.n} reference{acc_text} -> {storage.redact(out)}")
    shutdown()


def _all_reduce_accuracy(preds, labels, device):
    t = torch.tensor([float(sum(int(p == y) for p, y in zip(preds, labels))), float(len(labels))], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.to(device)
        torch.distributed.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else None


def _provenance(args) -> dict:
    if args.samples:
        url = storage.join(args.samples, "sampling.json")
        if storage.exists(url):
            return json.loads(storage.read_bytes(url))
    return {}


def _run_from_provenance(prov: dict) -> str | None:
    src = prov.get("source", "")
    path = src.split(" ")[0] if src else ""
    return path if path and os.path.isdir(path) else None


def _sample_indices(folder: str) -> list[int]:
    from .sample import existing_indices
    indices = sorted(existing_indices(folder))
    if not indices:
        raise FileNotFoundError(f"no NNNNNN.png images in '{storage.redact(folder)}'")
    return indices


def _read_png(folder: str, index: int) -> np.ndarray:
    from .sample import png_name
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(folder, png_name(index))))) as im:
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd in ("fid", "frechet"):
        from .parallel.env import spawn_local
        spawn_local(frechet_worker, (args,), args.world_size)
        return 0
    if args.cmd == "ref-stats":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        extractor = make_extractor(args.extractor, args, device, args.data)
        ref = compute_ref_stats(args.data, extractor, args.batch_size)
        ref.save(args.out)
        print(f"reference statistics of {ref.n} images ({extractor.name}, {extractor.resize_mode} resize) -> {args.out}")
        return 0
    from .eval.recon import recon_main
    return recon_main(args)


if __name__ == "__main__":
    run_cli(main)
