"""Images of any size (data/resize.py, samples.decode_for_training, `shards build --size --resize`) against an
independent reference written here with PIL calls: guided-diffusion's center_crop_arr (BOX halvings while the image
is at least twice the target, BICUBIC resize of the whole image, then a crop), on photo content of several sizes and
aspect ratios, PNG and JPEG, L and RGB."""

import io
import struct
import subprocess
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageFile
from sklearn.datasets import load_sample_image

from ddpm_dist.config import CHOICES, ConfigError, load_config
from ddpm_dist.data import ShardError, read_all, verify
from ddpm_dist.data.samples import RESIZE_MODES, decode_for_training
from ddpm_dist.training.setup import _check_data_matches_model
from tests.support.common import PYTHON, ROOT

PHOTO = load_sample_image("china.jpg")  # 427 x 640 RGB, a real photograph
SHAPES = [(120, 40), (37, 211), (64, 64), (7, 5), (427, 640), (300, 3)]  # tall, wide, square, small, photo, thin
TARGETS = [(16, 16), (12, 20), (33, 33)]


def photo(h, w):
    """Photo content at h x w: a crop of the photo, resized (BICUBIC) when it is larger than the photo."""
    crop = PHOTO[: min(h, 427), : min(w, 640)]
    return np.asarray(Image.fromarray(crop).resize((w, h), Image.BICUBIC)) if crop.shape[:2] != (h, w) else crop


def halve(im, H, W):
    while im.width >= 2 * W and im.height >= 2 * H:
        im = im.resize((im.width // 2, im.height // 2), resample=Image.BOX)
    return im


def resized_whole(im, H, W):
    """ADM center_crop_arr up to the crop: the whole image, short side (cover) scaled to the target."""
    im = halve(im, H, W)
    scale = max(W / im.width, H / im.height)
    size = (max(W, round(im.width * scale)), max(H, round(im.height * scale)))
    return np.asarray(im.resize(size, resample=Image.BICUBIC))


def reference(im, H, W, mode):
    if mode == "stretch":
        return np.asarray(halve(im, H, W).resize((W, H), Image.BICUBIC))
    if mode == "border":
        im = halve(im, H, W)
        scale = min(W / im.width, H / im.height)
        nw, nh = min(W, max(1, round(im.width * scale))), min(H, max(1, round(im.height * scale)))
        out = np.zeros((H, W) + np.asarray(im).shape[2:], np.uint8)
        out[(H - nh) // 2 : (H - nh) // 2 + nh, (W - nw) // 2 : (W - nw) // 2 + nw] = np.asarray(
            im.resize((nw, nh), Image.BICUBIC)
        )
        return out
    arr = resized_whole(im, H, W)
    y, x = (arr.shape[0] - H) // 2, (arr.shape[1] - W) // 2
    return arr[y : y + H, x : x + W]


def encode(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def hwc(a):
    return a[:, :, None] if a.ndim == 2 else a


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["center_crop", "border", "stretch"])
def test_matches_pil_reference(fmt, channels, mode):
    for h, w in SHAPES:
        data = encode(photo(h, w), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        for H, W in TARGETS:
            decoded = Image.open(io.BytesIO(data))
            decoded.load()
            ref = hwc(reference(decoded.convert("L" if channels == 1 else "RGB"), H, W, mode))
            got = decode_for_training({"__key__": "k", fmt.lower(): data}, (H, W, channels), mode, 0)
            assert got.shape == (H, W, channels) and got.dtype == np.uint8
            diff = np.abs(got.astype(int) - ref)
            # the crop box of one BICUBIC call vs. resize-then-crop: float rounding only
            assert diff.max() <= 1 and diff.mean() < 0.3, (h, w, H, W, diff.max(), diff.mean())


def test_exact_size_is_unchanged_and_npy_matches_png():
    img = photo(37, 211)
    for mode in RESIZE_MODES:
        assert np.array_equal(decode_for_training({"png": encode(img, "PNG")}, (37, 211, 3), mode, 7), img)
    from ddpm_dist.data.shard_sets import encode_image

    for mode in RESIZE_MODES[1:]:
        a = decode_for_training({"npy": encode_image(img, "npy")}, (16, 16, 3), mode, 3)
        b = decode_for_training({"png": encode(img, "PNG")}, (16, 16, 3), mode, 3)
        assert np.array_equal(a, b)


def test_jpeg_is_decoded_at_full_scale(monkeypatch):
    """No reduced-scale DCT decode (PIL draft): measured, it moved results by up to 13 grey levels."""
    from PIL import JpegImagePlugin

    calls, real = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, *a: calls.append(a) or real(self, *a))
    big = np.asarray(Image.fromarray(PHOTO).resize((1280, 854), Image.BICUBIC))
    data = encode(big, "JPEG", quality=90)
    for T in (8, 32):
        got = decode_for_training({"jpg": data}, (T, T, 3), "center_crop", 0)
        full = Image.open(io.BytesIO(data)).convert("RGB")
        assert np.abs(got.astype(int) - reference(full, T, T, "center_crop")).max() <= 1
    assert calls == []


def test_random_crop_is_seeded_and_in_bounds():
    img = photo(40, 150)
    data = encode(img, "PNG")
    whole = resized_whole(Image.fromarray(img), 16, 16)  # 16 x 60: offsets 0..44 along the width
    crops = {s: decode_for_training({"png": data}, (16, 16, 3), "random_crop", s) for s in range(12)}
    offsets = set()
    for s, crop in crops.items():
        assert np.array_equal(crop, decode_for_training({"png": data}, (16, 16, 3), "random_crop", s))
        errs = [np.abs(crop.astype(int) - whole[:, x : x + 16]).max() for x in range(whole.shape[1] - 15)]
        assert min(errs) <= 1  # a crop of the resized image at an in-bounds offset
        offsets.add(int(np.argmin(errs)))
    assert len(offsets) >= 6  # varies across seeds
    square = decode_for_training({"png": encode(photo(64, 64), "PNG")}, (16, 16, 3), "random_crop", 5)
    assert np.abs(square.astype(int) - reference(Image.fromarray(photo(64, 64)), 16, 16, "center_crop")).max() <= 1


def test_channels_and_sixteen_bit():
    rgb = photo(30, 30)
    grey = decode_for_training({"png": encode(rgb, "PNG")}, (30, 30, 1), "center_crop", 0)
    assert np.array_equal(grey[:, :, 0], np.asarray(Image.fromarray(rgb).convert("L")))
    assert decode_for_training({"png": encode(rgb[:, :, 0], "PNG")}, (8, 8, 3), "center_crop", 0).shape == (8, 8, 3)
    deep = Image.fromarray(np.array([[0, 1000, 65535, 32768]], np.uint16))
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    got = decode_for_training({"png": buf.getvalue()}, (1, 4, 1), "center_crop", 0)
    assert got[0, :, 0].tolist() == [0, 4, 255, 128]  # scaled, not clipped at 255 as PIL's I;16 -> L is


def png_header(w, h):
    """A valid PNG signature + IHDR claiming w x h RGB, a tiny IDAT and IEND: a few hundred bytes."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Image.open warns; we refuse
@pytest.mark.parametrize("w,h,why", [(10_000, 10_000, "decompression-bomb"), (20_000, 4, "outside 1..16384")])
def test_size_limits_refuse_before_decoding(monkeypatch, w, h, why):
    assert w * h < 2 * Image.MAX_IMAGE_PIXELS or h == 4  # PIL itself would only warn at 10^8 pixels
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    data = png_header(w, h)
    assert len(data) < 200
    for mode in RESIZE_MODES[1:]:
        with pytest.raises(ShardError, match=why):
            decode_for_training({"__key__": "bomb", "png": data}, (16, 16, 3), mode, 0)
    with pytest.raises(ShardError):
        decode_for_training({"__key__": "bomb", "png": data}, (16, 16, 3), "none", 0)
    assert loads == []
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 100_000, 3)}
    )
    npy = header.getvalue()
    with pytest.raises(ShardError, match="data bytes"):  # never allocated: the header promises 3e10 bytes, 0 are there
        decode_for_training({"npy": npy}, (16, 16, 3), "center_crop", 0)


def jpeg_folder(root, sizes):
    root.mkdir()
    for i, (h, w) in enumerate(sizes):
        (root / f"img{i}.jpg").write_bytes(encode(photo(h, w), "JPEG", quality=92))
    return [(root / f"img{i}.jpg").read_bytes() for i in range(len(sizes))]


def test_build_folder_of_mixed_sizes(tmp_path):
    sizes = [(90, 108), (62, 110), (200, 40), (10, 12), (427, 640)]
    files = jpeg_folder(tmp_path / "src", sizes)
    build = [
        str(PYTHON),
        "-m",
        "ddpm_dist.shards",
        "build",
        "--source",
        "folder",
        "--input",
        str(tmp_path / "src"),
        "--shuffle-seed",
        "-1",
    ]
    r = subprocess.run(build + ["--out", str(tmp_path / "plain")], cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert "img00000001 has shape (62, 110, 3), expected (90, 108, 3)" in errors[0]
    assert "--size N --resize center_crop" in errors[0]
    r = subprocess.run(
        build + ["--out", str(tmp_path / "o"), "--size", "16", "--resize", "center_crop"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert verify(str(tmp_path / "o" / "manifest.json"), progress=False).ok
    images, _ = read_all(str(tmp_path / "o" / "manifest.json"))
    assert images.shape == (5, 16, 16, 3)
    for img, data, _ in zip(images, files, sizes):
        assert np.array_equal(img, decode_for_training({"jpg": data}, (16, 16, 3), "center_crop", 0))
        ref = reference(Image.open(io.BytesIO(data)).convert("RGB"), 16, 16, "center_crop")
        assert np.abs(img.astype(int) - ref).max() <= 1


def test_build_random_crop_and_other_sources(tmp_path):
    from ddpm_dist.data.shard_sets import build_shards
    from ddpm_dist.data.sources import SourceError, open_source, parse_size

    jpeg_folder(tmp_path / "src", [(40, 150), (150, 40), (40, 150)])
    runs = [
        build_shards(
            open_source("folder", str(tmp_path / "src"), (16, 16), resize="random_crop", seed=s),
            str(tmp_path / f"r{s}{k}"),
            progress=False,
            shuffle_seed=None,
        )
        for s in (1, 2)
        for k in "ab"
    ]
    got = [read_all(str(tmp_path / f"r{s}{k}" / "manifest.json"))[0] for s in (1, 2) for k in "ab"]
    assert np.array_equal(got[0], got[1]) and not np.array_equal(got[0], got[2])
    assert runs[0].image_size == [16, 16]
    arr = np.stack([photo(40, 150), photo(40, 150)])
    np.save(tmp_path / "a.npy", arr)
    out = list(open_source("numpy", str(tmp_path / "a.npy"), (12, 20), resize="border"))
    assert np.array_equal(out[0][1], reference(Image.fromarray(arr[0]), 12, 20, "border"))
    assert parse_size("12x20") == (12, 20) and parse_size("7") == (7, 7)
    for bad in ("0", "3x", "ax4", "20000"):
        with pytest.raises(SourceError):
            parse_size(bad)
    with pytest.raises(SourceError, match="needs --size"):
        open_source("numpy", str(tmp_path / "a.npy"), None, resize="border")
    assert next(open_source("digits", size=12))[1].shape == (12, 12, 1)


def test_config_image_size_and_resize():
    assert CHOICES["data.resize"] == RESIZE_MODES
    cfg = load_config(None, ["data.image_size=[12, 20]", "data.resize=random_crop"])
    assert cfg.data.image_hw([16, 16]) == (12, 20) and load_config(None, []).data.image_hw([16, 16]) == (16, 16)
    with pytest.raises(ConfigError, match="data.resize: 'crop' is not one of none, center_crop, random_crop"):
        load_config(None, ["data.resize=crop"])
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(None, ["data.image_size=[1, 2, 3]"])
    manifest = SimpleNamespace(image_size=[16, 16], channels=1, num_classes=10, extra={})
    model = SimpleNamespace(image_size=32, in_channels=1, num_classes=10)
    _check_data_matches_model(manifest, model, load_config(None, ["data.image_size=32", "data.resize=center_crop"]))
    with pytest.raises(ConfigError, match="data.resize is none"):
        _check_data_matches_model(manifest, model, load_config(None, ["data.image_size=32"]))
    with pytest.raises(ConfigError, match="data.image_size is 24x24 but model.image_size is 32"):
        _check_data_matches_model(manifest, model, load_config(None, ["data.image_size=24", "data.resize=border"]))
