"""A small CNN trained on the embedded digits' own labels and cached: its penultimate features give a
Fréchet distance for the digits demo when the Inception file is absent (usual for MNIST-like data),
and its predictions check that class-conditional samples show the class asked for."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..images import from_float255
from .statistics import Extractor, module_checksum

log = logging.getLogger(__name__)


class DigitsNet(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int = 10, size: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (size // 4) ** 2, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x255: torch.Tensor) -> torch.Tensor:
        return self.body(from_float255(x255))

    def forward(self, x255: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x255))


def cache_dir() -> str:
    return os.environ.get("DDPM_CACHE", os.path.expanduser("~/.cache/ddpm_dist"))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel shifts: the classifier should not care where a generated digit sits."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(
    images: np.ndarray, labels: np.ndarray, epochs: int = 20, seed: int = 0
) -> tuple[DigitsNet, float]:
    """Train on 80%, report accuracy on the held-out 20%, then return the net (trained on the 80%)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(labels).long()
    order = torch.randperm(len(x), generator=g)
    split = int(0.8 * len(x))
    tr, te = order[:split], order[split:]
    net = DigitsNet(x.shape[1], int(y.max()) + 1, x.shape[2])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(net(_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[te]).argmax(1) == y[te]).float().mean().item()
    return net, acc


def digits_extractor(manifest_url: str, device: torch.device = torch.device("cpu")) -> tuple[Extractor, DigitsNet]:
    """The cached classifier for these shards (trained once, keyed by the manifest checksum)."""
    from safetensors.torch import load_file, save_file

    from ..data import load_manifest, read_all

    m = load_manifest(manifest_url)
    if not m.num_classes:
        raise ValueError(f"'{manifest_url}' has no labels: a classifier cannot be trained on it")
    path = os.path.join(cache_dir(), f"digits-classifier-{m.checksum()[:16]}.safetensors")
    size, ch = m.image_size[0], m.channels
    net = DigitsNet(ch, m.num_classes, size)
    if os.path.exists(path):
        net.load_state_dict(load_file(path))
    else:
        images, labels = read_all(manifest_url)
        net, acc = train_classifier(images, labels)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        log.info("trained the digits classifier (held-out accuracy %.3f), cached at %s", acc, path)
    net = net.to(device).eval()
    ext = Extractor("digits-classifier", net.features, module_checksum(net), "none", ch, device)
    return ext, net
