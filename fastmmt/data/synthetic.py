"""Procedural person re-ID domains in Market-1501 layout (the data of the synthetic demo).

Each identity is a combination of part attributes (skin, hair, upper colours + texture, sleeves,
lower garment + colour, shoes, bag, hat, body shape) drawn from a shared palette, so no single
colour identifies a person. Every image is one frame of a per-camera tracklet: viewpoint (front,
back, side), walking phase, scale, position, partial occlusion, a per-camera background scene and
per-camera illumination. A :class:`DomainStyle` then applies the domain's camera response (hue
rotation, saturation, gamma, colour cast), resolution loss, noise and JPEG quality; the two
built-in styles ("source", "target") differ systematically in all of these, in background clutter
and in the number of cameras. Rendering is vectorised over batches of images with numpy.
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fastmmt.data.datasets import MARKET_FOLDER

PID_OFFSET = {"source": 0, "target": 5000}  # keeps the two domains' 4-digit pids disjoint


@dataclass(frozen=True)
class DomainStyle:
    """Knobs of one domain's appearance (see docs/data.md for the built-in values)."""

    num_cams: int = 6                         # cameras 1..num_cams (Market names allow up to 9)
    hue_shift: float = 0.0                    # degrees, rotation of hue around the grey axis
    saturation: float = 1.0                   # 1 = unchanged, <1 washes colours out
    gamma: float = 1.0                        # applied to [0, 1] values after the cast
    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)   # global RGB gains
    camera_cast: float = 0.05                 # std of the per-camera log RGB gains
    camera_brightness: float = 0.08           # std of the per-camera log brightness
    clutter: int = 3                          # background objects per camera scene
    clutter_saturation: float = 0.15          # saturation of background objects (0 = grey)
    resolution: float = 1.0                   # render at this fraction of the size, then upsample
    noise: float = 0.015                      # std of per-pixel Gaussian noise
    occlusion_p: float = 0.08                 # probability of an occluder (pole / bottom block)
    jpeg_quality: int = 92
    shared_scene: bool = False                # every camera films the same backdrop (one site)


STYLES = {
    "source": DomainStyle(),
    # The target films one site with every camera (shared_scene), at half resolution, through a
    # different camera response (hue, saturation, gamma, cast), with more noise and stronger JPEG;
    # its cameras differ from each other 80% as much as the source's (camera_cast, brightness).
    # Camera-specific backgrounds or colour casts (the first design) made the source model's
    # features group target images by camera, and the pseudo-labels could not recover from that:
    # bench/RESULTS.md ("The synthetic demo") has the measurements.
    "target": DomainStyle(num_cams=5, hue_shift=90.0, saturation=0.7, gamma=1.3, cast=(1.06, 0.97, 0.82),
                          camera_cast=0.04, camera_brightness=0.062, resolution=0.5, noise=0.03,
                          jpeg_quality=80, shared_scene=True),
}

SIZES = {  # generate_domains presets: (train ids, test ids, images per id)
    "tiny": (12, 8, 6),
    "demo": (120, 60, 12),
    "large": (700, 700, 14),
}


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h % 1.0, s, v)


def _palettes() -> dict[str, np.ndarray]:
    """Clothing (10 hues x bright/dark + 4 neutrals), skin, hair, shoe palettes in [0, 1] RGB."""
    cloth = [_hsv(i / 10, 0.8, 0.85) for i in range(10)] + [_hsv(i / 10 + 0.05, 0.6, 0.45) for i in range(10)]
    cloth += [(0.08, 0.08, 0.09), (0.92, 0.92, 0.9), (0.5, 0.5, 0.52), (0.78, 0.7, 0.55)]
    skin = [(0.96, 0.8, 0.69), (0.87, 0.68, 0.52), (0.72, 0.52, 0.38), (0.5, 0.34, 0.24), (0.33, 0.22, 0.16)]
    hair = [(0.06, 0.05, 0.05), (0.3, 0.19, 0.1), (0.85, 0.72, 0.45), (0.6, 0.6, 0.6), (0.55, 0.22, 0.1)]
    shoe = [(0.05, 0.05, 0.05), (0.95, 0.95, 0.95), (0.45, 0.3, 0.18), (0.2, 0.25, 0.5)]
    return {k: np.asarray(v, dtype=np.float32) for k, v in
            dict(cloth=cloth, skin=skin, hair=hair, shoe=shoe).items()}


PALETTES = _palettes()


def _identities(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per-identity attributes (arrays of length n); colours get a small identity-specific jitter."""
    nc = len(PALETTES["cloth"])

    def pick(pal: str, jitter: float = 0.04) -> np.ndarray:
        c = PALETTES[pal][rng.integers(len(PALETTES[pal]), size=n)]
        return np.clip(c + rng.normal(0, jitter, c.shape), 0, 1).astype(np.float32)

    up_a = rng.integers(nc, size=n)
    up_b = (up_a + rng.integers(1, nc, size=n)) % nc  # a different second colour
    cloth = PALETTES["cloth"]

    def jitter(c: np.ndarray) -> np.ndarray:
        return np.clip(c + rng.normal(0, 0.04, c.shape), 0, 1).astype(np.float32)

    return dict(
        skin=pick("skin", 0.02), hair=pick("hair"), shoe=pick("shoe"),
        up_a=jitter(cloth[up_a]), up_b=jitter(cloth[up_b]), low=pick("cloth"), bag=pick("cloth"), hat_colour=pick("cloth"),
        up_tex=rng.integers(5, size=n),            # plain, h-stripes, v-stripes, checks, chest logo
        period=rng.choice(np.array([0.035, 0.05, 0.07], dtype=np.float32), size=n),
        short_sleeves=rng.random(n) < 0.4,
        low_type=rng.choice(3, size=n, p=[0.6, 0.2, 0.2]),   # trousers, shorts, skirt
        long_hair=rng.random(n) < 0.35,
        bag_type=rng.choice(4, size=n, p=[0.45, 0.15, 0.15, 0.25]),  # none, left, right, backpack
        has_hat=rng.random(n) < 0.2,
        torso=rng.uniform(0.11, 0.16, size=n).astype(np.float32),
        head=rng.uniform(0.055, 0.07, size=n).astype(np.float32),
        hip=rng.uniform(0.50, 0.56, size=n).astype(np.float32),
    )


@dataclass
class _Cameras:
    gains: np.ndarray        # (C, 3) illumination RGB gains
    scenes: np.ndarray       # (C, H, 3W, 3) background scenes, sliced per image
    front_p: np.ndarray      # (C,) probability of a frontal view


def _camera_log_gains(rng: np.random.Generator, c: int, cast: float, brightness: float) -> np.ndarray:
    """(c, 3) log RGB gains: per camera a tint of one strength in evenly spaced directions of the
    chroma plane, plus evenly spaced brightness offsets, both in random order.

    The strengths match independent normal draws (per-channel std ``cast``, brightness std
    ``brightness``) on average, but every seed's cameras differ from each other by the same amount:
    with random draws, how hard a seed's target was hinged on its luck (source-only mAP 59 vs 77
    for two seeds of one style).
    """
    u = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / np.sqrt([[2.0], [6.0]])  # chroma plane basis
    theta = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(c) / c
    tint = cast * np.sqrt(2.0) * (np.cos(theta)[:, None] * u[0] + np.sin(theta)[:, None] * u[1])
    light = brightness * np.sqrt(3.0) * np.linspace(-1.0, 1.0, c) * np.sqrt((c - 1) / (c + 1))
    return tint[rng.permutation(c)] + light[rng.permutation(c)][:, None]


def _cameras(rng: np.random.Generator, style: DomainStyle, h: int, w: int) -> _Cameras:
    c = style.num_cams
    gains = np.exp(_camera_log_gains(rng, c, style.camera_cast, style.camera_brightness))
    ys, xs = np.mgrid[0:h, 0:3 * w].astype(np.float32)
    scenes = np.empty((c, h, 3 * w, 3), dtype=np.float32)
    for k in range(c):
        wall = np.asarray(_hsv(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.45, 0.8)), np.float32)
        floor = np.asarray(_hsv(rng.random(), rng.uniform(0, 0.2), rng.uniform(0.3, 0.6)), np.float32)
        horizon = rng.uniform(0.45, 0.75) * h
        t = np.clip((ys - horizon) / (0.08 * h) + 0.5, 0, 1)[..., None]
        sc = (1 - t) * wall + t * floor
        sc = sc * (1 + 0.08 * np.sin(xs / rng.uniform(6, 20) + rng.random() * 6))[..., None]
        for _ in range(style.clutter):
            col = np.asarray(_hsv(rng.random(), style.clutter_saturation * rng.uniform(0.5, 1),
                                  rng.uniform(0.2, 0.95)), np.float32)
            cy, cx = rng.uniform(0, h), rng.uniform(0, 3 * w)
            ry, rx = rng.uniform(0.03, 0.2) * h, rng.uniform(0.05, 0.3) * w
            if rng.random() < 0.5:
                m = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1
            else:
                m = (np.abs(ys - cy) < ry) & (np.abs(xs - cx) < rx)
            sc[m] = col
        scenes[k] = sc
    if style.shared_scene:  # drawn as above, so the rest of the random stream does not move
        scenes[1:] = scenes[0]
    return _Cameras(gains.astype(np.float32), scenes, rng.uniform(0.2, 0.8, size=c))


def _plan_images(rng: np.random.Generator, ids: np.ndarray, per_id: int, cams: _Cameras,
                 num_cams: int) -> dict[str, np.ndarray]:
    """Per-image rows: identity row, camera, tracklet frame parameters."""
    rows: dict[str, list] = {k: [] for k in ("ident", "cam", "view", "phase", "scale", "dx", "dy", "bgx", "mirror")}
    for row in ids:
        n_cams = int(rng.integers(2, min(num_cams, 4) + 1))
        cam_set = rng.choice(num_cams, size=n_cams, replace=False)
        n = max(2 * n_cams, int(round(per_id * rng.uniform(0.7, 1.3))))
        counts = np.bincount(rng.integers(n_cams, size=n - 2 * n_cams), minlength=n_cams) + 2
        for cam, cnt in zip(cam_set, counts):
            # one tracklet per camera: a dominant viewpoint, slowly varying pose and framing
            view = 0 if rng.random() < cams.front_p[cam] else 1
            if rng.random() < 0.3:
                view = 2
            mirror = rng.random() < 0.5
            phase0, scale0, bgx0 = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.0), rng.uniform(0, 1)
            for f in range(cnt):
                rows["ident"].append(row)
                rows["cam"].append(cam)
                rows["view"].append(view if rng.random() > 0.15 else int(rng.integers(3)))
                rows["phase"].append(phase0 + 0.9 * f)
                rows["scale"].append(scale0 * rng.uniform(0.94, 1.06))
                rows["dx"].append(rng.normal(0, 0.04))
                rows["dy"].append(rng.normal(0, 0.02))
                rows["bgx"].append((bgx0 + 0.05 * f) % 1.0)
                rows["mirror"].append(mirror)
    return {k: np.asarray(v) for k, v in rows.items()}


def _capsule(u, v, x0, y0, x1, y1, r):
    """Mask of points within r of the segment (x0,y0)-(x1,y1); args broadcast to (N,H,W)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return (u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2 < r * r


def _ellipse(u, v, cx, cy, rx, ry):
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 < 1


def _box(u, v, u0, u1, v0, v1):
    return ((u > u0) & (u < u1)) & ((v > v0) & (v < v1))


# part labels of the label map; 0 is the background
BACKPACK, SKIN, LOWER, SHOE, UPPER_A, UPPER_B, STRAP, BAG, HAIR, HAT, OCCLUDER = range(1, 12)
NUM_LABELS = 12


def _render_labels(idn: dict[str, np.ndarray], im: dict[str, np.ndarray], h: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Part-label map (N,H,W) uint8 of the people of ``im`` and their colour table (N, 12, 3)."""
    n = len(im["ident"])
    a = {k: v[im["ident"]] for k, v in idn.items()}
    lab = np.zeros((n, h, w), dtype=np.uint8)

    def paint(mask: np.ndarray, label: int) -> None:
        lab[np.broadcast_to(mask, lab.shape)] = label

    def e(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32)[:, None, None]  # (N,) -> (N,1,1)

    # person frame: v from 0 (top of head) to 1 (feet) as (N,H,1); u horizontal as (N,1,W); both
    # in person heights; a mirrored tracklet flips u
    ph = 0.9 * h * im["scale"]
    top = 0.04 * h + im["dy"] * h + (0.9 * h - ph)
    v = (np.arange(h, dtype=np.float32)[None, :, None] - e(top)) / e(ph)
    sgn = np.where(im["mirror"], -1.0, 1.0)
    u = (np.arange(w, dtype=np.float32)[None, None, :] - e(w / 2 + im["dx"] * w)) / e(ph) * e(sgn)
    view = im["view"]
    front, back, side = e(view == 0), e(view == 1), e(view == 2)
    tw = e(a["torso"] * np.where(view == 2, 0.65, 1.0))
    hip = e(a["hip"])
    swing = np.sin(im["phase"])
    stride = e(swing * np.where(view == 2, 0.12, 0.025))
    leg_sep = e(np.where(view == 2, 0.012, 0.045))
    arm_sw = e(swing * np.where(view == 2, 0.1, 0.02))
    low_type = e(a["low_type"])
    # backpack body: behind the person (side view) or on the back (back view)
    bp = e(a["bag_type"] == 3)
    paint((bp * (side + back) > 0) & _box(u, v, -tw - 0.05 * side, tw * (1 - side) - 0.03 * side, 0.19, 0.46),
          BACKPACK)
    # legs (skin, covered by the lower garment down to its length) and shoes
    covered = np.where(low_type == 0, 0.93, np.where(low_type == 1, hip + 0.13, hip))
    for s in (-1.0, 1.0):
        hx, fx = s * leg_sep, s * (leg_sep + stride)
        leg = _capsule(u, v, hx, hip, fx, 0.94, 0.038)
        paint(leg, SKIN)
        paint(leg & (v < covered), LOWER)
        paint(_ellipse(u, v, fx + 0.02 * side, 0.955, 0.045, 0.022), SHOE)
    # hips / skirt (flares out downwards)
    skirt = e(a["low_type"] == 2)
    flare = np.clip((v - hip) / 0.22, 0, 1) * 0.05 * skirt
    paint(_box(u, v, -tw * 0.9 - flare, tw * 0.9 + flare, hip - 0.02, hip + 0.05 + 0.17 * skirt), LOWER)
    # torso with its texture in the second colour
    torso = _box(u, v, -tw, tw, 0.18, hip + 0.01) | _ellipse(u, v, 0, 0.2, tw, 0.04)
    per, tex = e(a["period"]), e(a["up_tex"])
    su, sv = np.floor(u / per), np.floor(v / per)
    second = (((tex == 1) & (sv % 2 == 1)) | ((tex == 2) & (su % 2 == 1)) | ((tex == 3) & ((su + sv) % 2 == 1))
              | ((tex == 4) & (front > 0) & _box(u, v, -0.05, 0.05, 0.24, 0.34)))
    paint(torso, UPPER_A)
    paint(torso & second, UPPER_B)
    # shoulder-bag strap across the chest; backpack straps seen from the front
    side_bag = e((a["bag_type"] == 1) | (a["bag_type"] == 2))
    paint(((side_bag * (1 - side)) > 0) & _capsule(u, v, -tw * 0.8, 0.19, tw * 0.8, hip - 0.04, 0.012), STRAP)
    bp_straps = _box(u, v, -tw * 0.75, -tw * 0.45, 0.19, 0.42) | _box(u, v, tw * 0.45, tw * 0.75, 0.19, 0.42)
    paint(bp_straps & (bp * front > 0), STRAP)
    # arms: sleeve to the elbow (short) or the wrist (long), then skin; the far arm is hidden
    # in a side view
    sleeve_end = np.where(e(a["short_sleeves"]) > 0, 0.3, hip - 0.04)
    for s in (-1.0, 1.0):
        sx = s * (tw + 0.02) * (1 - side)
        hx = sx + s * 0.02 * (1 - side) + s * arm_sw
        visible = (side == 0) if s < 0 else np.ones_like(side, dtype=bool)
        arm = _capsule(u, v, sx, 0.21, hx, hip - 0.02, 0.03) & visible
        paint(arm, SKIN)
        paint(arm & (v < sleeve_end), UPPER_A)
        paint(_ellipse(u, v, hx, hip, 0.028, 0.03) & visible, SKIN)
    # shoulder bag at the hip, on the other side when seen from behind
    bag_u = e(np.where(a["bag_type"] == 1, -1.0, 1.0)) * (tw + 0.05) * (1 - 2 * back)
    paint((side_bag > 0) & _box(u, v, bag_u - 0.05, bag_u + 0.05, hip - 0.1, hip + 0.04), BAG)
    # neck, head, hair (covers the head seen from behind), hat
    head_r = e(a["head"])
    paint(_box(u, v, -0.025, 0.025, 0.12, 0.2), SKIN)
    head = _ellipse(u, v, 0.012 * side, 0.09, head_r * (1 - 0.15 * side), 0.075)
    paint(head, SKIN)
    hair = head & ((v < 0.06) | (back > 0) | ((side > 0) & (u < -0.01)))
    long_hair = (e(a["long_hair"]) > 0) & _box(u, v, -head_r - 0.01, head_r + 0.01, 0.06, 0.22) & ~(head & (front > 0))
    paint(hair | long_hair, HAIR)
    hat = _ellipse(u, v, 0, 0.035, head_r * 1.15, 0.04) | _box(u, v, -head_r * 1.4, head_r * 1.4, 0.05, 0.065)
    paint((e(a["has_hat"]) > 0) & hat, HAT)

    table = np.zeros((n, NUM_LABELS, 3), dtype=np.float32)
    for label, key in ((BACKPACK, "bag"), (SKIN, "skin"), (LOWER, "low"), (SHOE, "shoe"), (UPPER_A, "up_a"),
                       (UPPER_B, "up_b"), (BAG, "bag"), (HAIR, "hair"), (HAT, "hat_colour")):
        table[:, label] = a[key]
    table[:, STRAP] = 0.7 * a["bag"]
    return lab, table


def _occlude(lab: np.ndarray, table: np.ndarray, rng: np.random.Generator, p: float, sat: float) -> None:
    """With probability p per image, add an occluder: a pole (vertical bar) or a bottom block."""
    n, h, w = lab.shape
    for i in np.flatnonzero(rng.random(n) < p):
        table[i, OCCLUDER] = _hsv(rng.random(), sat * rng.random(), rng.uniform(0.2, 0.9))
        if rng.random() < 0.5:
            x0 = int(rng.integers(0, w - 4))
            lab[i, :, x0:x0 + int(rng.integers(4, max(5, w // 6)))] = OCCLUDER
        else:
            lab[i, h - int(rng.uniform(0.15, 0.35) * h):, :] = OCCLUDER


def _respond(x: np.ndarray, gains: np.ndarray, style: DomainStyle) -> np.ndarray:
    """Camera light (RGB ``gains`` broadcast against x) then the domain's colour response:
    cast, hue rotation about the grey axis, saturation, clip to [0, 1], gamma."""
    x = x * gains * np.asarray(style.cast, np.float32)
    if style.hue_shift:
        th = np.deg2rad(style.hue_shift)
        k = np.full(3, 1 / np.sqrt(3))
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rot = np.eye(3) + np.sin(th) * kx + (1 - np.cos(th)) * kx @ kx
        x = x @ rot.T.astype(np.float32)
    if style.saturation != 1.0:
        lum = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        x = lum + style.saturation * (x - lum)
    return (np.clip(x, 0, 1) ** style.gamma).astype(np.float32)


def _compose(lab: np.ndarray, table: np.ndarray, im: dict[str, np.ndarray], cams: _Cameras,
             style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Final uint8 (N,H,W,3) images: responded person colours over the responded camera scene,
    top-lit shading and sensor noise."""
    n, h, w = lab.shape
    cam = im["cam"]
    scenes = _respond(cams.scenes, cams.gains[:, None, None, :], style)   # once per camera
    x0 = (im["bgx"] * 2 * w).astype(int)
    x = np.empty((n, h, w, 3), dtype=np.float32)
    for i in range(n):
        x[i] = scenes[cam[i], :, x0[i]:x0[i] + w]
    colours = _respond(table, cams.gains[cam][:, None, :], style)
    shade = (1.05 - 0.15 * np.arange(h, dtype=np.float32) / h)[None, :, None, None]
    flat = lab.astype(np.int64) + NUM_LABELS * np.arange(n)[:, None, None]
    person = np.take(colours.reshape(-1, 3), flat, axis=0) * shade
    np.copyto(x, person, where=(lab > 0)[..., None])
    bank = style.noise * rng.standard_normal((8, h, w, 3), dtype=np.float32)  # noise tiles, reused
    x += bank[rng.integers(8, size=n)]
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _save(arr: np.ndarray, path: str, style: DomainStyle) -> None:
    img = Image.fromarray(arr)
    if style.resolution < 1.0:
        w, h = img.size
        small = (max(1, round(w * style.resolution)), max(1, round(h * style.resolution)))
        img = img.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)
    img.save(path, quality=style.jpeg_quality)


def generate_synthetic(out_dir: str, *, seed: int = 0, domain: str = "source", num_ids: int = 120,
                       num_test_ids: int = 60, images_per_id: int = 12, height: int = 128, width: int = 64,
                       style: DomainStyle | None = None, num_distractors: int | None = None,
                       num_junk: int | None = None, batch: int = 128) -> str:
    """Write one synthetic domain under ``out_dir/Market-1501-v15.09.15`` and return that folder.

    ``domain`` ("source" or "target") picks the default :class:`DomainStyle` and the pid range
    (source 0001.., target 5001..: disjoint). Train and test identities are disjoint; per test
    identity one query per camera holding >= 2 of its images, the rest in the gallery, plus
    ``num_distractors`` pid-0000 and ``num_junk`` pid -1 gallery images (default ~2% / ~1%).
    Deterministic: the same arguments give byte-identical files.
    """
    if domain not in STYLES:
        raise ValueError(f"domain must be one of {sorted(STYLES)}, got {domain!r}")
    style = style or STYLES[domain]
    if not 2 <= style.num_cams <= 9:
        raise ValueError(f"num_cams must be in 2..9 (one digit in Market names), got {style.num_cams}")
    if num_ids < 1 or num_test_ids < 1 or images_per_id < 2 or num_ids + num_test_ids > 4999:
        raise ValueError(f"need num_ids >= 1, num_test_ids >= 1, num_ids + num_test_ids <= 4999 and "
                         f"images_per_id >= 2; got {num_ids}, {num_test_ids}, {images_per_id}")
    if height < 16 or width < 8:
        raise ValueError(f"image size {height}x{width} too small (need at least 16x8)")
    rng = np.random.default_rng([seed, list(STYLES).index(domain)])
    cams = _cameras(rng, style, height, width)
    idn = _identities(rng, num_ids + num_test_ids)
    pids = PID_OFFSET[domain] + 1 + np.arange(num_ids + num_test_ids)
    im = _plan_images(rng, np.arange(num_ids + num_test_ids), images_per_id, cams, style.num_cams)
    split = np.where(im["ident"] < num_ids, 0, 2)  # 0 train, 1 query, 2 gallery
    for ident in range(num_ids, num_ids + num_test_ids):
        rows = np.flatnonzero(im["ident"] == ident)
        cam_counts = np.bincount(im["cam"][rows], minlength=style.num_cams)
        for cam in np.flatnonzero(cam_counts >= 2):
            split[rng.choice(rows[im["cam"][rows] == cam])] = 1
    base = os.path.join(out_dir, MARKET_FOLDER)
    folders = ["bounding_box_train", "query", "bounding_box_test"]
    for f in folders:
        os.makedirs(os.path.join(base, f), exist_ok=True)
    frame = np.zeros(style.num_cams, dtype=np.int64)
    names = []
    for i in range(len(split)):
        c = im["cam"][i]
        frame[c] += int(rng.integers(1, 30))
        names.append(os.path.join(base, folders[split[i]], f"{pids[im['ident'][i]]:04d}_c{c + 1}s1_{frame[c]:06d}_01.jpg"))
    for start in range(0, len(names), batch):
        sl = slice(start, start + batch)
        sub = {k: v[sl] for k, v in im.items()}
        lab, table = _render_labels(idn, sub, height, width)
        _occlude(lab, table, rng, style.occlusion_p, style.clutter_saturation)
        out = _compose(lab, table, sub, cams, style, rng)
        for arr, path in zip(out, names[sl]):
            _save(arr, path, style)
    n_gal = int((split == 2).sum())
    _write_extras(base, rng, cams, style, idn, height, width, frame,
                  max(1, n_gal // 50) if num_distractors is None else num_distractors,
                  max(1, n_gal // 100) if num_junk is None else num_junk)
    meta = dict(domain=domain, seed=seed, num_ids=num_ids, num_test_ids=num_test_ids,
                images_per_id=images_per_id, height=height, width=width, style=dataclasses.asdict(style))
    with open(os.path.join(base, "synthetic.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return base


def _write_extras(base: str, rng: np.random.Generator, cams: _Cameras, style: DomainStyle,
                  idn: dict[str, np.ndarray], h: int, w: int, frame: np.ndarray, n_distractors: int,
                  n_junk: int) -> None:
    """Gallery distractors (pid 0000: badly framed people) and junk (pid -1: background only)."""
    n = n_distractors + n_junk
    if n == 0:
        return
    c = rng.integers(style.num_cams, size=n)
    im = dict(ident=rng.integers(len(idn["skin"]), size=n), cam=c, view=rng.integers(3, size=n),
              phase=rng.uniform(0, 6.3, n), scale=rng.uniform(1.4, 2.2, n), dx=rng.uniform(-0.5, 0.5, n),
              dy=rng.uniform(-0.6, 0.1, n), bgx=rng.random(n), mirror=rng.random(n) < 0.5)
    lab, table = _render_labels(idn, im, h, w)
    lab[n_distractors:] = 0
    out = _compose(lab, table, im, cams, style, rng)
    for i in range(n):
        frame[c[i]] += int(rng.integers(1, 30))
        pid = "0000" if i < n_distractors else "-1"
        _save(out[i], os.path.join(base, "bounding_box_test", f"{pid}_c{c[i] + 1}s1_{frame[c[i]]:06d}_01.jpg"), style)


def generate_domains(out_dir: str, seed: int = 0, size: str = "demo", height: int = 128,
                     width: int = 64) -> tuple[str, str]:
    """Write the "source" and "target" domains of preset ``size`` (see :data:`SIZES`) under
    ``out_dir/source`` and ``out_dir/target``; return their dataset folders."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    ids, test_ids, per_id = SIZES[size]
    return tuple(generate_synthetic(os.path.join(out_dir, d), seed=seed, domain=d, num_ids=ids,
                                    num_test_ids=test_ids, images_per_id=per_id, height=height, width=width)
                 for d in ("source", "target"))  # type: ignore[return-value]
