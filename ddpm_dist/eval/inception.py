"""clean-fid's Inception network (the FID's feature extractor) from a local file only, verified before it is loaded:
a TorchScript file carries code, and nothing can be downloaded at run time."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

import torch

from .statistics import Extractor

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def file_checksum(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# A TorchScript file carries code, so the file is verified before it is loaded. No primary source publishes a
# checksum of clean-fid's inception-2015-12-05.pt (clean-fid and NVlabs/stylegan2-ada-pytorch give only the URL
# above; searched 2026-11), so there is none to compare with here: instead the first file used is pinned (its
# sha256 in the pin file) and any other file is refused later, as reference statistics already refuse features
# from another file. /tmp is not searched: anyone can put a file there.
PUBLISHED_SHA256: Optional[str] = None
PIN_FILE = os.path.join(os.path.expanduser("~/.cache/ddpm_dist"), INCEPTION_FILE + ".sha256")


class UnverifiedWeights(ValueError):
    """An Inception file that is not the published or pinned one (one-line message)."""


def inception_path(explicit: Optional[str] = None) -> str:
    """Where the Inception file is: --inception, $DDPM_INCEPTION, ~/.cache/ddpm_dist/, ./"""
    candidates = [
        explicit,
        os.environ.get("DDPM_INCEPTION"),
        os.path.join(os.path.expanduser("~/.cache/ddpm_dist"), INCEPTION_FILE),
        INCEPTION_FILE,
    ]
    for c in candidates:
        if not c:
            continue
        path = os.path.join(c, INCEPTION_FILE) if os.path.isdir(c) else c
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Inception weights '{INCEPTION_FILE}' not found (looked at --inception, $DDPM_INCEPTION, ~/.cache/ddpm_dist/, "
        f"./): download {INCEPTION_URL} where there is internet and pass --inception PATH"
    )


def verify_inception(path: str, checksum: str, allow_unverified: bool = False) -> None:
    """Compare with the published checksum (none known) or the pinned one ($DDPM_INCEPTION_PIN or PIN_FILE);
    the first verified use pins. allow_unverified: use any file, pin nothing (e.g. a random-weight test network)."""
    pin_file = os.environ.get("DDPM_INCEPTION_PIN") or PIN_FILE
    expected, source = PUBLISHED_SHA256, "the published checksum"
    if expected is None and os.path.isfile(pin_file):
        with open(pin_file) as f:
            expected, source = f.read().strip(), f"the checksum pinned in {pin_file} at its first use"
    if allow_unverified:
        if checksum != expected:
            log.warning(
                "Inception file %s is not verified (sha256 %s...): its FID is not comparable", path, checksum[:12]
            )
        return
    if expected is None:
        os.makedirs(os.path.dirname(pin_file) or ".", exist_ok=True)
        tmp = f"{pin_file}.tmp-{os.getpid()}"  # every rank pins the same file: none may read a half-written pin
        with open(tmp, "w") as f:
            f.write(checksum + "\n")
        os.replace(tmp, pin_file)
        log.info(
            "Inception file %s (sha256 %s...) pinned in %s: another file will be refused", path, checksum[:12], pin_file
        )
    elif checksum != expected:
        raise UnverifiedWeights(
            f"Inception file '{path}' has sha256 {checksum[:16]}..., not {source} "
            f"({expected[:16]}...): pass --allow-unverified-inception to use it anyway"
        )


def inception_extractor(
    path: Optional[str] = None, device: torch.device = torch.device("cpu"), allow_unverified: bool = False
) -> Extractor:
    """clean-fid's Inception (TorchScript) with clean-fid's normalisation, from a local, verified file only."""
    path = inception_path(path)
    checksum = file_checksum(path)
    verify_inception(path, checksum, allow_unverified)
    from cleanfid.inception_torchscript import InceptionV3W

    net = InceptionV3W(os.path.dirname(os.path.abspath(path)), download=False, resize_inside=False).to(device).eval()
    return Extractor("inception-2015-12-05", net, checksum, "clean", 3, device)
