import pytest
import torch

from ddpm_dist.models import PRESETS, build_model, count_parameters


def test_ddpm_cifar10_matches_paper_parameter_count():
    n = count_parameters(build_model("ddpm-cifar10"))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name):
    m = build_model(name).eval()
    c = m.config
    x = torch.randn(2, c.in_channels, c.image_size, c.image_size)
    y = torch.tensor([0, 1]) if c.num_classes else None
    with torch.no_grad():
        out = m(x, torch.tensor([0, 999]), y=y)
    assert out.shape == x.shape


def test_class_embedding_has_null_class_and_changes_output():
    m = build_model({"preset": "tiny", "num_classes": 3})
    assert m.class_emb.num_embeddings == 4
    for p in m.parameters():  # zero-initialised output layers make every label look alike: perturb them
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    assert not torch.allclose(m(x, t, y=torch.tensor([0])), m(x, t, y=torch.tensor([1])))
    assert torch.allclose(m(x, t), m(x, t, y=torch.tensor([3])))  # None = the null class


def test_scale_shift_vs_add_time_conditioning():
    a = build_model({"preset": "tiny", "time_conditioning": "scale_shift"})
    b = build_model({"preset": "tiny", "time_conditioning": "add"})
    assert count_parameters(a) > count_parameters(b)


def test_bad_model_config_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size"):
        build_model({"preset": "tiny", "image_size": 17})
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("nope")
