"""diffusers' UNet2DModel both ways, against diffusers itself: each preset it can express exports with no missing or
unexpected keys and computes the same function; DDIMPipeline on the export makes our DDIM's images; a UNet2DModel in
google/ddpm-cifar10-32's config, saved by diffusers, imports and computes diffusers' function; ours -> diffusers ->
ours is bitwise; what cannot be mapped is one line naming the field."""

import json
import os

import pytest
import torch

from ddpm_dist.artifacts import load_trained, save_export
from ddpm_dist.artifacts.diffusers_format import DiffusersMappingError
from ddpm_dist.config import DiffusionConfig
from ddpm_dist.diffusion import make_schedule
from ddpm_dist.diffusion.samplers import DDIMStep, run_steps
from ddpm_dist.export import main as export_main
from ddpm_dist.models import build_model, count_parameters, resolve_model_config
from ddpm_dist.models.diffusers_unet import to_diffusers_config

diffusers = pytest.importorskip("diffusers")

# google/ddpm-cifar10-32's unet/config.json as diffusers 0.24 writes it (the DDPM paper's TensorFlow network).
DDPM_CIFAR10_32 = dict(
    act_fn="silu",
    add_attention=True,
    attention_head_dim=None,
    attn_norm_num_groups=None,
    block_out_channels=[128, 256, 256, 256],
    center_input_sample=False,
    class_embed_type=None,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    downsample_padding=0,
    downsample_type="conv",
    dropout=0.0,
    flip_sin_to_cos=False,
    freq_shift=1,
    in_channels=3,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-06,
    norm_num_groups=32,
    num_class_embeds=None,
    num_train_timesteps=None,
    out_channels=3,
    resnet_time_scale_shift="default",
    sample_size=32,
    time_embedding_type="positional",
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    upsample_type="conv",
)
EXPRESSIBLE = ("tiny", "digits", "ddpm-cifar10")


def randomized(model, seed=0, std=0.05):
    """Every weight drawn (the zero-initialised output convolutions too), so every block shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    y = torch.tensor([1, cfg.num_classes]) if cfg.num_classes else None  # a class and the null class
    return x, torch.tensor([3, 917]), y


@pytest.fixture(scope="module", params=EXPRESSIBLE)
def exported(request, tmp_path_factory):
    """(our model, the export command's folder) for one preset; diffusion: a cosine schedule, 200 steps."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = resolve_model_config(request.param)
    model = randomized(build_model(cfg))
    diffusion = {"schedule": "cosine", "num_steps": 200, "beta_start": 1e-4, "beta_end": 0.02, "prediction": "eps"}
    info = {"diffusion": diffusion, "sample": {"sampler": "ddim", "steps": 10}}
    save_export(str(tmp / "export.safetensors"), model.state_dict(), None, cfg, info)
    assert export_main(["--export", str(tmp / "export.safetensors"), "--out", str(tmp / "hf")]) == 0
    return model, str(tmp / "hf")


def test_export_loads_in_diffusers_with_no_missing_keys_and_the_same_outputs(exported):
    model, folder = exported
    unet, info = diffusers.UNet2DModel.from_pretrained(os.path.join(folder, "unet"), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert count_parameters(unet) == count_parameters(model)
    x, t, y = inputs(model.config)
    with torch.no_grad():
        ours, theirs = model(x, t, y), unet.eval()(x, t, class_labels=y).sample
    assert ours.abs().max() > 0.01  # 1000 x the tolerance: not two near-zero outputs compared
    assert (ours - theirs).abs().max().item() <= 1e-5
    for pipeline in (diffusers.DDPMPipeline, diffusers.DDIMPipeline):
        loaded = pipeline.from_pretrained(folder)
        assert type(loaded.unet).__name__ == "UNet2DModel"
    sched = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert (sched["beta_schedule"], sched["num_train_timesteps"], sched["prediction_type"]) == (
        "squaredcos_cap_v2",
        200,
        "epsilon",
    )


def test_round_trip_ours_diffusers_ours_is_bitwise(exported):
    model, folder = exported
    back = load_trained(folder)
    assert back.config == model.config
    mine, theirs = model.state_dict(), back.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert back.diffusion == DiffusionConfig(schedule="cosine", num_steps=200)
    assert (back.sampler.sampler, back.sampler.steps) == ("ddim", 10)  # the sampler settings ride along


def test_ddim_pipeline_makes_our_ddim_images(exported):
    """The same x_T (diffusers' randn_tensor with a seeded CPU generator) through DDIMPipeline and our DDIM over the
    pipeline's timesteps, eta 0, x0 clipped and eps recomputed from it (use_clipped_model_output, as ours does)."""
    model, folder = exported
    pipe = diffusers.DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    cfg, steps = model.config, 5
    shape = (2, cfg.in_channels, cfg.image_size, cfg.image_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    pipe.scheduler.set_timesteps(steps)
    timesteps = sorted(int(t) for t in pipe.scheduler.timesteps)
    if cfg.num_classes:  # DDIMPipeline has no class input: the same loop with the null class (unconditional)
        y = torch.full((2,), cfg.num_classes)
        x = x_T.clone()
        with torch.no_grad():
            for t in pipe.scheduler.timesteps:
                eps = pipe.unet(x, t, class_labels=y).sample
                x = pipe.scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        theirs = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        kwargs = {"y": y}
    else:
        out = pipe(
            batch_size=2,
            generator=torch.Generator().manual_seed(7),
            num_inference_steps=steps,
            eta=0.0,
            use_clipped_model_output=True,
            output_type="np",
        )
        theirs, kwargs = out.images, {}
    schedule = make_schedule("cosine", 200)
    step = DDIMStep(model, schedule, timesteps, eta=0.0, clip_x0=True, model_kwargs=kwargs)
    with torch.no_grad():
        ours = (run_steps(step, x_T) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert theirs.shape == ours.shape
    assert abs(theirs - ours).max() <= 1e-4
    assert ours.std() > 0.01  # images, not a constant


def test_imagenet64_and_conditioning_channels_cannot_be_expressed(tmp_path):
    with pytest.raises(DiffusersMappingError, match=r"^model.num_heads=4: .* one attention_head_dim .*\[96, 128\]"):
        to_diffusers_config(resolve_model_config("imagenet64"))
    cfg = resolve_model_config({"preset": "tiny", "cond_channels": 3})
    save_export(str(tmp_path / "sr.safetensors"), build_model(cfg).state_dict(), None, cfg, {})
    with pytest.raises(DiffusersMappingError, match=r"^model.cond_channels=3: "):
        export_main(["--export", str(tmp_path / "sr.safetensors"), "--out", str(tmp_path / "hf")])
    assert not os.path.exists(tmp_path / "hf")  # nothing written


def test_ddpm_cifar10_32_config_saved_by_diffusers_imports(tmp_path):
    unet = diffusers.UNet2DModel(**DDPM_CIFAR10_32)
    randomized(unet, seed=3, std=0.03)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp_path / "hf"))
    trained = load_trained(str(tmp_path / "hf"))
    cfg = trained.config
    assert count_parameters(trained.model) == 35_746_307
    assert (cfg.base_channels, cfg.channel_mults, cfg.attn_resolutions, cfg.time_conditioning) == (
        128,
        [1, 2, 2, 2],
        [16],
        "add",
    )
    assert (cfg.norm_eps, cfg.downsample_padding, cfg.time_freq_shift, cfg.time_flip_sin_to_cos) == (1e-6, 0, 1, False)
    assert (trained.sampler.sampler, trained.sampler.var_type, trained.diffusion.num_steps) == ("ddpm", "large", 1000)
    x, t, _ = inputs(cfg)
    with torch.no_grad():
        ours, theirs = trained.model(x, t), unet(x, t).sample
    assert ours.abs().max() > 0.01
    assert (ours - theirs).abs().max().item() <= 1e-5


def small_unet(**overrides):
    kw = dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=None,
    )
    return diffusers.UNet2DModel(**{**kw, **overrides})


def test_pickle_weights_are_refused_in_one_line(tmp_path):
    small_unet().save_pretrained(str(tmp_path / "unet"), safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "unet")) == ["config.json", "diffusion_pytorch_model.bin"]
    with pytest.raises(ValueError, match=r"has only diffusion_pytorch_model.bin \(a pickle") as e:
        load_trained(str(tmp_path / "unet"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"act_fn": "mish"}, "act_fn"),
        ({"down_block_types": ["DownBlock2D", "SkipDownBlock2D"]}, "down_block_types"),
        ({"resnet_time_scale_shift": "ada_group"}, "resnet_time_scale_shift"),
        ({"block_out_channels": [16, 24]}, "block_out_channels"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "up_block_types"),
    ],
)
def test_a_config_we_cannot_map_is_one_line_naming_the_field(tmp_path, overrides, field):
    """The config is read before any weight: written as diffusers would, with the one field changed."""
    small_unet().save_pretrained(str(tmp_path / "unet"))
    path = tmp_path / "unet" / "config.json"
    config = json.loads(path.read_text())
    config.update(overrides)
    path.write_text(json.dumps(config))
    with pytest.raises(DiffusersMappingError, match=rf"config.json: {field}: ") as e:
        load_trained(str(tmp_path / "unet"))
    assert "\n" not in str(e.value)
