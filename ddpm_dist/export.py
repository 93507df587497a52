"""python -m ddpm_dist.export --run DIR | --export FILE | --diffusers DIR --out DIR [--weights ema|raw]

Writes a trained model as a diffusers pipeline folder: model_index.json, unet/config.json +
unet/diffusion_pytorch_model.safetensors and scheduler/scheduler_config.json (the run's schedule, prediction,
posterior variance and x0 clipping), so `DDPMPipeline.from_pretrained(DIR)` and `DDIMPipeline.from_pretrained(DIR)`
load it with no missing or unexpected keys. The EMA weights by default. What diffusers cannot express (conditioning
channels; a number of heads that gives two head sizes) is one line naming it, and nothing is written. A
class-conditional model's extra class (index num_classes) is its classifier-free guidance null class."""

from __future__ import annotations

import argparse

from .command_line import add_model_source, model_source, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ddpm_dist.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_source(p)
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest", help="with --run: which checkpoint")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or the raw weights")
    p.add_argument("--format", choices=("diffusers",), default="diffusers", help="diffusers' pipeline folder")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    return p


def main(argv: list[str]) -> int:
    from .artifacts import load_trained
    from .artifacts.diffusers_format import save_diffusers

    args = build_parser().parse_args(argv)
    if not args.run and args.checkpoint != "latest":
        raise ValueError("--checkpoint chooses among a run's checkpoints: use --run DIR")
    trained = load_trained(model_source(args), "model" if args.weights == "raw" else "ema", args.checkpoint)
    state = trained.model.state_dict()
    save_diffusers(args.out, trained.config, state, trained.diffusion, trained.sampler, trained.source)
    print(f"wrote {args.out}: {trained.source} as diffusers' DDPMPipeline (UNet2DModel, DDPMScheduler)", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
