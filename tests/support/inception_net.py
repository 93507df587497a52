"""A TorchScript file in the format of clean-fid's inception-2015-12-05.pt, with random weights, for tests.

What is real: the module tree and interface clean-fid relies on (cleanfid/inception_torchscript.py): a
TorchScript module whose `layers` maps normalised NCHW images ((x - 128) / 128, 299x299) to (N, 2048, 1, 1)
pool features, and whose own forward(x, return_features) takes 0..255 images of any size, resizes them to
299x299 itself and returns the 2048 features (return_features=True) or class probabilities over 1008 classes.
`layers` is the FID Inception-v3 (pytorch-fid's FIDInceptionA/C/E: torchvision's Inception-v3 blocks with
average pools that exclude padding and a max pool in the last block), block for block, kernel for kernel and
stride for stride, ending in 2048 channels (320 + 768 + 768 + 192) at 8x8 and a global average pool.
What is reduced: the weights are random (no file is downloaded), and `width` scales every inner channel
count (width=1 is the real network) so that a test runs in seconds on two CPU cores; the last two blocks keep
their real 2048 output channels, the feature size every consumer expects. The original resizes inside with
TensorFlow's bilinear; this one with torch's bilinear (only `layers` is on the FID path: clean-fid resizes
outside the network in its "clean" mode)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(64), 1)
        self.branch5x5_1 = BasicConv2d(cin, w(48), 1)
        self.branch5x5_2 = BasicConv2d(w(48), w(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)
        self.out_channels = w(64) + w(64) + w(96) + pool_features

    def forward(self, x):
        pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # FID Inception: padding excluded
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(pool),
            ],
            1,
        )


class InceptionB(nn.Module):
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, w(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, stride=2)
        self.out_channels = w(384) + w(96) + cin

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(192), 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, w(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, w(192), (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, w(192), 1)
        self.out_channels = 4 * w(192)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
        pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(pool)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, w(192), 1)
        self.branch3x3_2 = BasicConv2d(w(192), w(320), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, w(192), 1)
        self.branch7x7x3_2 = BasicConv2d(w(192), w(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(w(192), w(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(w(192), w(192), 3, stride=2)
        self.out_channels = w(320) + w(192) + cin

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """The last two blocks: 320 + 2 * 384 + 2 * 384 + 192 = 2048 output channels, kept at full width."""

    def __init__(self, cin: int, w, max_pool: bool):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, w(384), 1)
        self.branch3x3_2a = BasicConv2d(w(384), 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(w(384), 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, w(448), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(448), w(384), 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(w(384), 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(w(384), 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)
        self.max_pool = max_pool  # FIDInceptionE_2: a max pool (TensorFlow's graph), E_1: an average pool
        self.out_channels = 2048

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pool = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pool),
            ],
            1,
        )


def fid_inception_layers(width: float = 1.0) -> nn.Sequential:
    """299x299 normalised images -> (N, 2048, 1, 1): the FID Inception-v3 up to its pool features."""

    def w(c: int) -> int:
        return max(4, int(round(c * width)))

    layers = [
        BasicConv2d(3, w(32), 3, stride=2),
        BasicConv2d(w(32), w(32), 3),
        BasicConv2d(w(32), w(64), 3, padding=1),
        nn.MaxPool2d(3, stride=2),
        BasicConv2d(w(64), w(80), 1),
        BasicConv2d(w(80), w(192), 3),
        nn.MaxPool2d(3, stride=2),
    ]
    cin = w(192)
    for pool_features in (w(32), w(64), w(64)):  # Mixed_5b, 5c, 5d (35x35)
        layers.append(InceptionA(cin, pool_features, w))
        cin = layers[-1].out_channels
    layers.append(InceptionB(cin, w))  # Mixed_6a -> 17x17
    cin = layers[-1].out_channels
    for c7 in (w(128), w(160), w(160), w(192)):  # Mixed_6b..6e
        layers.append(InceptionC(cin, c7, w))
        cin = layers[-1].out_channels
    layers.append(InceptionD(cin, w))  # Mixed_7a -> 8x8
    cin = layers[-1].out_channels
    layers.append(InceptionE(cin, w, max_pool=False))  # Mixed_7b
    layers.append(InceptionE(2048, w, max_pool=True))  # Mixed_7c
    layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers)


class FIDInception(nn.Module):
    def __init__(self, width: float = 1.0):
        super().__init__()
        self.layers = fid_inception_layers(width)
        self.output = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        bs = x.shape[0]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).view(bs, 2048)
        if return_features:
            return features
        return F.softmax(self.output(features), dim=1)


def random_fid_inception(width: float = 1.0, seed: int = 0) -> FIDInception:
    """Random weights that keep activations in range through the ~20 layers (He init; BN as identity)."""
    torch.manual_seed(seed)
    net = FIDInception(width)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval()


def save_inception_torchscript(path: str, width: float = 1.0, seed: int = 0) -> str:
    """Script the network (both forward and `layers`, as clean-fid calls them) and save it at `path`."""
    torch.jit.script(random_fid_inception(width, seed)).save(path)
    return path
