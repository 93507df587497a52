"""Fréchet distances from feature statistics that every rank accumulates for its own images.

Each rank adds float64 sums of features and of their outer products; the sums are all-reduced (never
the images, EDM fid.py); mean and covariance follow; the distance is clean-fid's frechet_distance.
Extractors are pluggable: clean-fid's Inception (the FID, "clean" resize), a digits classifier for the
embedded data set (a Fréchet distance, never called FID), or any network a test builds."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..data import storage
from ..images import to_float255
from ..parallel.collectives import all_reduce_sum_, get_world_size

log = logging.getLogger(__name__)


class StatsMismatch(ValueError):
    pass


@dataclass
class Extractor:
    """`net` maps float NCHW images (values 0..255, RGB, after the resize) to features."""

    name: str
    net: Callable[[torch.Tensor], torch.Tensor]
    checksum: str
    resize_mode: str  # "clean" (clean-fid: PIL bicubic to 299x299 on uint8) or "none"
    channels: int = 3
    device: torch.device = torch.device("cpu")

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> float NCHW as the net expects it (grey -> RGB for RGB nets, the clean resize)."""
        if images.shape[-1] == 1 and self.channels == 3:
            images = np.repeat(images, 3, axis=-1)
        if self.resize_mode == "clean":
            return clean_resize(images)
        if self.resize_mode == "none":
            return to_float255(images)
        raise ValueError(f"unknown resize mode '{self.resize_mode}'")

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        return self.net(self.prepare(images).to(self.device)).double().cpu()


def module_checksum(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureStats:
    """Running float64 sums for the mean and covariance of features. Rows wait in a small buffer and enter the
    d x d sum in one in-place GEMM per FLUSH_ROWS: one product per 32-image batch wrote and re-read a 32 MB
    temporary (2048 features) and made the sums 15% of the feature pass."""

    FLUSH_ROWS = 1024

    def __init__(self, dim: int):
        self.n = 0
        self.s = torch.zeros(dim, dtype=torch.float64)
        self.ss = torch.zeros(dim, dim, dtype=torch.float64)
        self._rows: list[torch.Tensor] = []
        self._pending = 0

    def add(self, feats: torch.Tensor) -> None:
        f = feats.double().cpu()
        self.n += f.shape[0]
        self._rows.append(f)
        self._pending += f.shape[0]
        if self._pending >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            f = torch.cat(self._rows)
            self.s += f.sum(0)
            self.ss.addmm_(f.T, f)
            self._rows, self._pending = [], 0

    def all_reduce(self, device: torch.device) -> "FeatureStats":
        """Sum the statistics of every rank (one collective of float64 sums; no images move)."""
        self._flush()
        if get_world_size() > 1:
            packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.s, self.ss.flatten()]).to(
                device
            )
            packed = all_reduce_sum_(packed).cpu()
            d = self.s.numel()
            self.n, self.s, self.ss = int(round(packed[0].item())), packed[1 : 1 + d], packed[1 + d :].view(d, d)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a covariance, have {self.n}")
        mu = self.s / self.n
        cov = (self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)  # unbiased, as np.cov
        return mu.numpy(), cov.numpy()


def clean_resize(images: np.ndarray, size: int = 299) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, bit for bit clean-fid's "clean" resize (`cleanfid.resize.build_resizer`: each
    channel as a float32 PIL image, bicubic to size x size, clipped to [0, 255]). Written out because clean-fid's
    function concatenates, re-casts and then needs a strided copy per image: here each channel is clipped
    straight into the batch, and a channel equal to the one before (grey images made RGB) is resized once.
    tests/unit/test_fid.py holds it equal to clean-fid's."""
    from PIL import Image

    out = np.empty((len(images), images.shape[-1], size, size), dtype=np.float32)
    for i, img in enumerate(images):
        for c in range(img.shape[-1]):
            channel = img[:, :, c]
            if c and np.array_equal(channel, img[:, :, c - 1]):
                out[i, c] = out[i, c - 1]
                continue
            resized = Image.fromarray(channel.astype(np.float32)).resize((size, size), Image.BICUBIC)  # mode F
            np.clip(np.asarray(resized), 0, 255, out=out[i, c])
    return torch.from_numpy(out)


def accumulate(
    extractor: Extractor,
    batches: Iterable[np.ndarray],
    stats: Optional[FeatureStats] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    on_features: Optional[Callable[[torch.Tensor], None]] = None,
) -> FeatureStats:
    """Add the features of every batch (and hand them, as the network gave them, to `on_features`, in batch
    order). The next batch is read and resized in a background thread while the network runs on the current
    one (both release the GIL for most of their work)."""
    from concurrent.futures import ThreadPoolExecutor

    def prepared(it):
        b = next(it, None)
        return None if b is None else (len(b), extractor.prepare(b))

    it = iter(batches)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepared, it)
        while True:
            item = pending.result()
            if item is None:
                break
            pending = pool.submit(prepared, it)
            n, x = item
            with torch.no_grad():
                raw = extractor.net(x.to(extractor.device))
            f = raw.double().cpu()
            stats = stats or FeatureStats(f.shape[1])
            stats.add(f)
            if on_features:
                on_features(raw)
            if on_batch:
                on_batch(n)
    if stats is None:
        raise ValueError("no images")
    return stats


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """clean-fid's implementation (it adds eps*I when the product of covariances is singular, as it is
    for features with dead ReLU units; scipy's warning about it is expected then)."""
    import warnings

    from cleanfid.fid import frechet_distance as fd
    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(fd(mu1, sigma1, mu2, sigma2))


OPTIONAL_ARRAYS = ("features", "class_mu", "class_sigma", "class_n")
CLASS_STATS_MAX_BYTES = 2 << 30  # K * d^2 float64: CIFAR-10 with Inception takes 336 MB, 1000 classes would take 33 GB


@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str
    extractor_checksum: str
    resize_mode: str
    data_checksum: str
    features: Optional[np.ndarray] = None  # real features (KID, precision / recall): all or a seeded sample
    class_mu: Optional[np.ndarray] = None  # (K, d) per-class statistics of labelled data
    class_sigma: Optional[np.ndarray] = None  # (K, d, d)
    class_n: Optional[np.ndarray] = None  # (K,)

    @classmethod
    def of(cls, stats: "FeatureStats", extractor: Extractor, data_checksum: str, features=None) -> "RefStats":
        """The statistics accumulated in `stats`, labelled with the extractor that made them and the data's checksum."""
        mu, sigma = stats.mean_cov()
        return cls(
            mu, sigma, stats.n, extractor.name, extractor.checksum, extractor.resize_mode, data_checksum, features
        )

    def save(self, path: str) -> str:
        buf = io.BytesIO()
        extra = {k: getattr(self, k) for k in OPTIONAL_ARRAYS if getattr(self, k) is not None}
        np.savez(
            buf,
            mu=self.mu,
            sigma=self.sigma,
            n=self.n,
            extractor=self.extractor,
            extractor_checksum=self.extractor_checksum,
            resize_mode=self.resize_mode,
            data_checksum=self.data_checksum,
            **extra,
        )
        storage.write_bytes_atomic(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str) -> "RefStats":
        if not storage.exists(path):
            raise FileNotFoundError(f"reference statistics '{path}' do not exist")
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
            extra = {k: z[k] for k in OPTIONAL_ARRAYS if k in z.files}
            return cls(
                z["mu"],
                z["sigma"],
                int(z["n"]),
                str(z["extractor"]),
                str(z["extractor_checksum"]),
                str(z["resize_mode"]),
                str(z["data_checksum"]),
                **extra,
            )

    def check(self, extractor: Extractor) -> None:
        if self.extractor_checksum != extractor.checksum or self.resize_mode != extractor.resize_mode:
            raise StatsMismatch(
                f"reference statistics were computed with extractor {self.extractor} "
                f"({self.extractor_checksum[:12]}..., resize '{self.resize_mode}'), "
                f"not {extractor.name} ({extractor.checksum[:12]}..., resize "
                f"'{extractor.resize_mode}'): distances would not be comparable"
            )


def compute_ref_stats(
    data: str,
    extractor: Extractor,
    batch_size: int = 64,
    max_features: int = 0,
    per_class: bool = True,
    split: str = "train",
) -> RefStats:
    """Reference statistics of every image of a shard set, tied to the extractor and the data's checksum; with
    the features of at most `max_features` images (a uniform sample, seed 0, in data order) and, for labelled
    data, per-class statistics (unless per_class=False or they would exceed CLASS_STATS_MAX_BYTES)."""
    from tqdm import tqdm

    from ..data import load_manifest, read_all

    m = load_manifest(data).split(split)
    images, labels = read_all(data, split=split)
    n = len(images)
    keep = np.zeros(n, dtype=bool)
    if max_features:
        keep[np.random.default_rng(0).choice(n, max_features, replace=False) if max_features < n else slice(None)] = (
            True
        )
    kept: list[np.ndarray] = []
    by_class: dict[int, FeatureStats] = {}
    per_class = per_class and bool(m.num_classes)
    done = 0

    def on_features(raw: torch.Tensor) -> None:
        nonlocal done, per_class
        f, span = raw.cpu(), slice(done, done + len(raw))
        done += len(raw)
        kept.append(f[torch.from_numpy(keep[span])].numpy())
        if per_class and m.num_classes * f.shape[1] ** 2 * 8 > CLASS_STATS_MAX_BYTES:
            log.warning(
                "no per-class statistics: %d classes x %d^2 float64 exceed %d bytes",
                m.num_classes,
                f.shape[1],
                CLASS_STATS_MAX_BYTES,
            )
            per_class = False
        for c in np.unique(labels[span]) if per_class else ():
            by_class.setdefault(int(c), FeatureStats(f.shape[1])).add(f[torch.from_numpy(labels[span] == c)])

    batches = (images[i : i + batch_size] for i in range(0, n, batch_size))
    stats = accumulate(
        extractor,
        tqdm(batches, total=-(-n // batch_size), desc="reference features", unit="batch"),
        on_features=on_features,
    )
    ref = RefStats.of(stats, extractor, m.checksum(), np.concatenate(kept) if max_features else None)
    mu = ref.mu
    if per_class:
        d, k = len(mu), m.num_classes
        ref.class_mu, ref.class_sigma = np.zeros((k, d)), np.zeros((k, d, d))
        ref.class_n = np.zeros(k, dtype=np.int64)
        for c, s in by_class.items():
            ref.class_n[c] = s.n
            if s.n >= 2:
                ref.class_mu[c], ref.class_sigma[c] = s.mean_cov()
    return ref


def reference_stats(
    extractor: Extractor,
    *,
    ref: Optional[str] = None,
    data: Optional[str] = None,
    batch_size: int = 64,
    max_features: int = 0,
) -> RefStats:
    """Saved statistics (checked against the extractor), else computed from a shard manifest."""
    if ref:
        stats = RefStats.load(ref)
        stats.check(extractor)
        return stats
    if not data:
        raise ValueError("give --ref (statistics .npz) or --data (shard manifest)")
    return compute_ref_stats(data, extractor, batch_size, max_features)
