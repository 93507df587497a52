"""Small random conv nets with the input contract of clean-fid's feature models (299x299 images in 0..255), as
extractors for tests and benchmarks: what they measure is the pipeline around the features, not the features."""

import torch

from ddpm_dist.eval.statistics import Extractor, module_checksum


class StandInNet(torch.nn.Module):
    """Two strided convolutions, pooled to `pool` x `pool`: channels[1] * pool**2 features (times `scale`), the
    weights from seed 0."""

    def __init__(self, channels=(8, 16), pool=2, scale=1):
        super().__init__()
        torch.manual_seed(0)
        self.scale = scale
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, channels[0], 7, stride=4),
            torch.nn.ReLU(),
            torch.nn.Conv2d(channels[0], channels[1], 5, stride=4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(pool),
            torch.nn.Flatten(),
        )

    def forward(self, x):
        features = self.body(x / 128 - 1)
        return features if self.scale == 1 else self.scale * features


def stand_in_extractor(name: str, **net) -> Extractor:
    """A StandInNet(**net) in eval mode as a clean-resize Extractor named `name`."""
    module = StandInNet(**net).eval()
    return Extractor(name, module, module_checksum(module), "clean")
