"""DALI graphs against the torch + Pillow reference on the same files (CPU DALI).

Tolerances, measured here on smooth noisy test images (normalised units; one 8-bit level is
1/(255*0.229) ~= 0.017): no resize (source already HxW) -> identical bits (same libjpeg-turbo
decode, same normalisation arithmetic); bicubic upscaling 128x64 -> 256x128 max 0.035 / mean 0.0039, 97x41 -> 256x128 max
0.052 / mean 0.0036; antialiased downscaling 300x150 -> 64x32 max 0.088 (5 levels) / mean
0.0031 (DALI's cubic resampler and Pillow's differ in rounding and antialias support).
The bounds below are 0.105 max (6 levels) and 0.008 mean.

GPU variants (marked ``gpu``) run the same graphs on the GPU (nvJPEG ``mixed`` decoding, GPU
resize) and copy the outputs back. nvJPEG's IDCT is not libjpeg-turbo's: it may differ by a
level or two, so GPU JPEG comparisons get GPU_JPEG_SLACK (2 levels) on top; PNG decodes exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastmmt.data import ImageRecord, TestTransform, load_image
from fastmmt.data.dali import DaliTestLoader
from fastmmt.data.augment import AugmentSpec, batch_views
from fastmmt.data.dali_ops import train_pipeline, view_columns
from fastmmt.data.transforms import normalize, resize_to_tensor

pytestmark = pytest.mark.dali  # skipped, with the reason, where DALI is not installed

RESIZE_MAX, RESIZE_MEAN = 0.105, 0.008
GPU_JPEG_SLACK = 2 / (255 * 0.225)
ON_GPU = pytest.param("gpu", marks=pytest.mark.gpu)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour pattern plus noise, like a natural crop (decoders agree on it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([127 + 100 * np.sin(yy / (5 + seed) + xx / 7), 127 + 100 * np.cos(xx / (3 + seed)),
                     yy * 255.0 / h], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def write_images(tmp_path, arrays, fmt="JPEG", mode=None) -> list[ImageRecord]:
    recs = []
    for i, arr in enumerate(arrays):
        img = Image.fromarray(arr)
        if mode is not None:
            img = img.convert(mode)
        path = str(tmp_path / f"{i:03d}_{mode or 'RGB'}.{'jpg' if fmt == 'JPEG' else 'png'}")
        img.save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        recs.append(ImageRecord(path, i, i % 3))
    return recs


def dali_vs_reference(recs, height, width, batch_size=5, device="cpu"):
    loader = DaliTestLoader(recs, height, width, batch_size=batch_size, device=device)
    ref = TestTransform(height, width)
    got, want, order = [], [], []
    for images, pids, camids, idx in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, height, width)
        assert pids.tolist() == [recs[i].pid for i in idx.tolist()]
        assert camids.tolist() == [recs[i].camid for i in idx.tolist()]
        assert images.device.type == ("cuda" if device == "gpu" else "cpu")
        got.append(images.cpu())
        want.append(torch.stack([ref(load_image(recs[i].path)) for i in idx.tolist()]))
        order += idx.tolist()
    assert order == list(range(len(recs)))  # record order, last partial batch included
    return torch.cat(got), torch.cat(want)


@pytest.mark.parametrize("src,dst", [((128, 64), (256, 128)), ((300, 150), (64, 32)),
                                     ((97, 41), (64, 32))])
@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_test_pipeline_matches_reference_with_resize(tmp_path, src, dst, device):
    recs = write_images(tmp_path, [smooth_image(*src, seed=s) for s in range(12)])
    got, want = dali_vs_reference(recs, *dst, device=device)
    diff = (got - want).abs()
    slack = GPU_JPEG_SLACK if device == "gpu" else 0.0
    assert diff.max() <= RESIZE_MAX + slack and diff.mean() <= RESIZE_MEAN + slack / 4, (diff.max(), diff.mean())


def test_test_pipeline_equals_reference_without_resize(tmp_path):
    recs = write_images(tmp_path, [smooth_image(64, 32, seed=s) for s in range(7)])
    got, want = dali_vs_reference(recs, 64, 32, batch_size=3)
    assert torch.equal(got, want)  # same decoder, same normalisation arithmetic: the same bits


@pytest.mark.gpu
def test_gpu_test_pipeline_png_without_resize_equals_reference(tmp_path):
    """PNG has no IDCT: the GPU graph without resize must reproduce the reference exactly."""
    recs = write_images(tmp_path, [smooth_image(64, 32, seed=s) for s in range(7)], "PNG")
    got, want = dali_vs_reference(recs, 64, 32, batch_size=3, device="gpu")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "L"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"),
                                      ("JPEG", "CMYK")])
def test_grey_alpha_palette_inputs_decode_to_rgb(tmp_path, fmt, mode):
    arrays = [smooth_image(40, 20, seed=s) for s in range(3)]
    if mode == "RGBA":
        arrays = [np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]) for a in arrays]
        recs = write_images(tmp_path, arrays, fmt)
    else:
        recs = write_images(tmp_path, arrays, fmt, mode)
    got, want = dali_vs_reference(recs, 40, 20)
    tol = 1e-5 if fmt == "PNG" else 0.06  # JPEG colour conversion (grey/CMYK) rounds differently
    assert (got - want).abs().max() <= tol


@pytest.mark.parametrize("src", [(1, 1), (3, 2), (2, 5)])
def test_tiny_images(tmp_path, src):
    recs = write_images(tmp_path, [smooth_image(*src, seed=s) for s in range(3)], "PNG")
    got, want = dali_vs_reference(recs, 32, 16)
    assert torch.isfinite(got).all()
    if src == (1, 1):  # a single pixel upscales to a constant image in both
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:  # extreme upscaling: kernels differ most at the borders; bound by a few levels
        assert (got - want).abs().max() <= 0.15 and (got - want).abs().mean() <= 0.05


def reference_view(x: torch.Tensor, flip: int, crop, anchor, shape, pad: int, fill) -> torch.Tensor:
    """The spec's ops with given draws: flip -> zero pad -> crop -> normalise -> erase."""
    h, w = x.shape[1:]
    if flip:
        x = x.flip(-1)
    x = F.pad(x, (pad,) * 4)[:, crop[0]:crop[0] + h, crop[1]:crop[1] + w]
    out = normalize(x)
    out[:, anchor[0]:anchor[0] + shape[0], anchor[1]:anchor[1] + shape[1]] = \
        torch.tensor(fill, dtype=torch.float32).view(3, 1, 1)
    return out


@pytest.mark.parametrize("pad", [10, 3, 0])
@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_train_graph_applies_given_draws_like_reference(tmp_path, pad, device):
    """Feed known flip/crop/erase draws; each view equals the reference ops on the same draws."""
    h, w, n, views = 32, 16, 24, 2
    recs = write_images(tmp_path, [smooth_image(h, w, seed=s) for s in range(n)], "PNG")
    encoded = [np.fromfile(r.path, dtype=np.uint8) for r in recs]
    fill = (0.3, -1.0, 2.5)
    spec = AugmentSpec(h, w, pad=pad, erase_p=0.7, erase_fill=fill)
    params = batch_views(spec, range(700, 700 + n), views)
    assert any(p.flip.any() for p in params) and any(p.erase_shape.any() for p in params)
    if pad:
        assert any((p.crop != pad).any() for p in params)
    batch = (encoded, np.arange(n, dtype=np.int64), *[c for p in params for c in view_columns(p, pad)])

    def source():
        return batch

    pipe = train_pipeline(source, batch_size=n, spec=spec, num_views=views, prefetch=1, device=device,
                          device_id=0 if device == "gpu" else None)
    pipe.build()
    outs = [o.as_cpu() if device == "gpu" else o for o in pipe.run()]
    assert np.array(outs[0].as_tensor()).tolist() == list(range(n))
    for v, p in enumerate(params):
        got = torch.from_numpy(np.array(outs[1 + v].as_tensor()))
        for i, rec in enumerate(recs):
            x = resize_to_tensor(load_image(rec.path), h, w)
            want = reference_view(x, int(p.flip[i]), p.crop[i], p.erase_anchor[i], p.erase_shape[i], pad, fill)
            if device == "cpu":  # the CPU kernels' arithmetic is the reference's: the same bits
                assert torch.equal(got[i], want), (v, i)
            else:
                torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def proto_fields(buf: bytes) -> list[tuple[int, bytes | int]]:
    """Top-level (field number, value) pairs of a protobuf message (wire format)."""
    def varint(i):
        shift = value = 0
        while True:
            b = buf[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return value, i
    out, i = [], 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        else:
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        out.append((key >> 3, value))
    return out


def op_devices(serialized: bytes) -> list[tuple[str, str]]:
    """(operator name, its ``device`` argument) for each op of a serialised DALI pipeline."""
    ops = []
    for field, op in proto_fields(serialized):
        if field != 5:  # PipelineDef.op
            continue
        fields = proto_fields(op)
        name = next(v for f, v in fields if f == 1).decode()
        device = ""
        for f, arg in fields:
            if f == 4:  # Argument {name = 1, string value = 5}
                parts = dict(proto_fields(arg))
                if parts.get(1) == b"device":
                    device = parts[5].decode()
        ops.append((name, device))
    return ops


def test_gpu_graph_is_defined_and_serialised_without_a_gpu():
    """The GPU variant cannot be built here (no CUDA driver), but DALI defines, validates the
    arguments of, and serialises the same graph with nvJPEG ``mixed`` decoding and GPU ops."""
    kwargs = dict(batch_size=8, spec=AugmentSpec(32, 16), num_views=2)
    cpu = op_devices(train_pipeline(lambda: None, device="cpu", **kwargs).serialize())
    gpu = op_devices(train_pipeline(lambda: None, device="gpu", **kwargs).serialize())
    assert [n for n, _ in gpu] == [n for n, _ in cpu]  # one definition, two placements
    by_name = {}
    for name, dev in gpu:
        by_name.setdefault(name, set()).add(dev)
    assert by_name["decoders__Image"] == {"mixed"}
    for name in ("Resize", "Slice", "CropMirrorNormalize", "Erase"):
        assert by_name[name] == {"gpu"}, (name, by_name[name])
    assert by_name["ExternalSource"] == {"cpu"}  # bytes and draws are fed from host memory
    assert {d for _, d in cpu} <= {"cpu"}
    assert sum(n == "Erase" for n, _ in gpu) == 2  # one independent branch per view


@pytest.mark.parametrize("kind", ["BMP", "TIFF", "jpeg_with_trailer"])
def test_other_formats_and_trailing_bytes_are_not_rejected(tmp_path, kind):
    """Files the cheap JPEG/PNG check cannot vouch for are decoded by Pillow once and kept."""
    arrays = [smooth_image(32, 16, seed=s) for s in range(3)]
    if kind == "jpeg_with_trailer":
        recs = write_images(tmp_path, arrays)
        for r in recs:
            with open(r.path, "ab") as f:
                f.write(b"camera metadata after the end marker")
    else:
        recs = write_images(tmp_path, arrays, "PNG")
        for r in recs:
            Image.open(r.path).save(r.path, format=kind)
    got, want = dali_vs_reference(recs, 32, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
