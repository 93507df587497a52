"""A model saved by diffusers' own save_pretrained, used as users would: `sample --diffusers` writes its images,
`evaluate frechet --diffusers` scores them on the digits, `train.init_from` fine-tunes it (model and EMA start from its
weights) and `export --run` hands the run back to diffusers; a model key that contradicts the source is one line."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.artifacts import load_trained
from ddpm_dist.models import UNet
from tests.support.train_helpers import run_module, run_train

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random-weight, class-conditional UNet2DModel the digits training shape (1 x 16 x 16, 10 classes + the null
    class), diffusers' default flip_sin_to_cos, with the digits config's cosine schedule of 200 steps."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=[16, 32, 32],
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=11,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2")
    path = tmp_path_factory.mktemp("hf") / "digits-unet"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
    return path


def unet_weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))


def test_sample_and_evaluate_a_diffusers_model(folder, tmp_path):
    out = tmp_path / "samples"
    r = run_module("ddpm_dist.sample", "--diffusers", folder, "--out", out, "--num-images", 6, "--steps", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png") and f[0].isdigit())
    assert len(pngs) == 6, os.listdir(out)
    image = np.asarray(Image.open(out / pngs[0]))
    assert image.shape == (16, 16) and image.std() > 0
    r = run_module(
        "ddpm_dist.evaluate",
        "frechet",
        "--diffusers",
        folder,
        "--data",
        "shards/digits/manifest.json",
        "--num-images",
        32,
        "--steps",
        3,
        "--out",
        tmp_path / "frechet.json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "frechet.json").read_text())
    assert result["n"] == 32 and result["value"] > 0, result


def test_fine_tune_from_diffusers_and_export_back(folder, tmp_path):
    run = tmp_path / "run"
    run_train(run, 1, f"train.init_from={folder}", "train.lr=1e-7", "train.warmup_images=0")
    source = unet_weights(folder)
    imported = load_trained(str(folder))
    torch.manual_seed(0)
    fresh = UNet(imported.config).state_dict()  # what the run would have started from without init_from
    assert max((fresh[k] - v).abs().max().item() for k, v in imported.model.state_dict().items()) > 0.05
    for weights in ("ema", "raw"):
        out = tmp_path / f"back-{weights}"
        r = run_module("ddpm_dist.export", "--run", run, "--weights", weights, "--out", out)
        assert r.returncode == 0, r.stderr[-3000:]
        back = unet_weights(out)
        assert back.keys() == source.keys()
        # one Adam step of lr 1e-7 away from the diffusers weights: the model and its EMA started from them
        assert max((back[k] - source[k]).abs().max().item() for k in source) < 1e-5, weights
    unet, info = diffusers.UNet2DModel.from_pretrained(str(out / "unet"), output_loading_info=True)
    assert not any(info.values())


def test_a_model_key_that_contradicts_the_source_is_one_line(folder, tmp_path):
    r = run_train(tmp_path / "run", 1, f"train.init_from={folder}", "model.base_channels=32", check=False)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.base_channels=32 differs from train.init_from"), last
