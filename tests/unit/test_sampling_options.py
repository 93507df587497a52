"""One SamplerOptions for the config, the command lines and the library; every task honours every option."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.diffusion import SAMPLER_DEFAULTS, SamplerOptions
from tests.support.common import DIGITS


def test_defaults_are_the_samplers_own_until_set():
    o = SamplerOptions()
    assert o.resolved(1000) == SamplerOptions("ddim", 50, 0.0)
    assert SamplerOptions("ddpm").resolved(1000) == SamplerOptions("ddpm", 1000, 1.0)
    assert SamplerOptions("ddpm", guidance=3.0).resolved(200, conditional=False).guidance == 1.0
    run = SamplerOptions("ddpm", 1000, var_type="large", guidance=2.0)  # e.g. the cifar10 config
    # steps and eta belong to the sampler they were set for; the rest carries over
    assert run.updated(sampler="ddim") == SamplerOptions("ddim", None, None, var_type="large", guidance=2.0)
    assert run.updated(sampler="ddim", steps=20).resolved(1000).steps == 20
    assert run.updated(steps=None, guidance=1.5) == dataclasses.replace(run, guidance=1.5)
    assert SamplerOptions.from_mapping({"sampler": "ddpm", "num_images": 64, "use_ema": True}) == SamplerOptions("ddpm")
    with pytest.raises(ValueError, match="steps: 2000 is not in"):
        SamplerOptions(steps=2000).resolved(1000)
    with pytest.raises(ValueError, match="var_type: 'huge'"):
        SamplerOptions(var_type="huge").validate()


def test_sampler_names_match_the_step_functions():
    from ddpm_dist.diffusion import SAMPLER_NAMES, STEPS

    assert set(SAMPLER_NAMES) == set(STEPS) == set(SAMPLER_DEFAULTS)


@pytest.mark.parametrize(
    "module,argv",
    [
        ("ddpm_dist.sample", ["--export", "x", "--out", "y"]),
        ("ddpm_dist.evaluate", ["fid", "--samples", "x"]),
        ("ddpm_dist.evaluate", ["frechet", "--run", "x"]),
    ],
)
def test_every_option_is_a_flag_of_every_command_that_samples(module, argv):
    import importlib

    parser = importlib.import_module(module).build_parser()
    flags = [
        "--sampler",
        "ddpm",
        "--steps",
        "7",
        "--eta",
        "0.5",
        "--spacing",
        "quadratic",
        "--var-type",
        "large",
        "--guidance",
        "2.5",
        "--no-clip",
    ]
    from ddpm_dist.command_line import sampler_overrides

    assert sampler_overrides(parser.parse_args(argv + flags)) == dict(
        sampler="ddpm", steps=7, eta=0.5, spacing="quadratic", var_type="large", guidance=2.5, clip_x0=False
    )
    assert sampler_overrides(parser.parse_args(argv)) == {}  # unset: the run's own settings


def export(tmp_path, **model) -> str:
    """A digits-shaped model with random (non-zero) weights as an export file."""
    from ddpm_dist.artifacts import save_export
    from ddpm_dist.models import build_model

    torch.manual_seed(0)
    net = build_model({"preset": "digits", "base_channels": 16, "norm_groups": 8, **model})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / "export.safetensors")
    save_export(
        path,
        net.state_dict(),
        None,
        net.config,
        {"diffusion": {"schedule": "cosine", "num_steps": 100}, "sample": {"sampler": "ddim", "steps": 6}},
    )
    return path


CHANGES = {
    "steps": {"steps": 4},
    "eta": {"eta": 0.7},
    "spacing": {"spacing": "quadratic"},
    "var_type": {"sampler": "ddpm", "steps": 6, "var_type": "large"},
    "guidance": {"guidance": 3.0},
    "clip": {"clip_x0": False},
}


@pytest.mark.parametrize("task", ["generate", "inpaint", "sr"])
def test_every_task_honours_every_option(tmp_path, task):
    """The images of a task change with each sampler option (guidance only for class-conditional models, and
    the DDPM variance compared under DDPM), through the path `sample --task` takes."""
    from ddpm_dist.artifacts import load_trained
    from ddpm_dist.sampling import TaskSpec, build_task, make_share, prepare

    trained = load_trained(export(tmp_path, **({"num_classes": 0, "cond_channels": 1} if task == "sr" else {})))
    spec = TaskSpec(task, image=None if task == "generate" else DIGITS, image_index=4, mask="lower-half")
    made = {}
    for name, change in {"base": {}, "ddpm_base": {"sampler": "ddpm", "steps": 6}, **CHANGES}.items():
        setup = prepare(trained, torch.device("cpu"), change)
        share = [([0, 1, 2], True)]
        made[name] = next(
            make_share(setup, share, seed=1, classes=None, num_images=3, task=build_task(spec, trained.config))
        )[1]
    for name in CHANGES:
        base = made["ddpm_base" if name == "var_type" else "base"]
        if name == "guidance" and task == "sr":  # unconditional: the option resolves to 1
            assert np.array_equal(made[name], base)
        else:
            assert not np.array_equal(made[name], base), name


def test_grid_has_one_class_per_row(tmp_path):
    """With classes cycled 0,1,2 and three images per row, grid.png holds class 0, 1 and 2 in rows."""
    from ddpm_dist.drawing import auto_scale, grid
    from ddpm_dist.sampling import SampleJob, sample_to_folder

    out = tmp_path / "out"
    sample_to_folder(
        SampleJob(
            export(tmp_path),
            str(out),
            num_images=9,
            batch_size=4,
            classes="0,1,2",
            sampler={"steps": 3},
            extras="yes",
            grid_width=3,
        )
    )
    images = np.stack([np.asarray(Image.open(out / f"{i:06d}.png"))[..., None] for i in range(9)])
    by_class = images[[0, 3, 6, 1, 4, 7, 2, 5, 8]]
    expected = grid(by_class, 3, scale=auto_scale(16))[..., 0]
    assert np.array_equal(np.asarray(Image.open(out / "grid.png")), expected)
