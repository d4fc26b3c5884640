"""Drawing phantom chest radiographs: vectorised numpy on a [0, 1] coordinate grid (y down, x right).

A body outline, two lungs with vascular markings, ribs, a mediastinum and spine, a heart and diaphragm domes,
on a frontal (PA) and a lateral view, with each finding drawn so that it is clearly visible even at 128 px:

- cardiomegaly (heart width vs chest width: normal ~0.45, mild ~0.58, moderate ~0.66, severe ~0.74),
- pleural effusion (fluid fills the lung base and blunts the costophrenic angle),
- pneumothorax (a dark rim without lung markings and a bright visceral pleural line),
- focal consolidation (a dense, irregular airspace opacity), nodule (a round, sharply marginated density).

Frontal views follow the radiological convention: the patient's right is on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .phantom_findings import LOBE_Y, SIDES, ZONE_Y, Finding

# heart width / chest width drawn for each severity (normal hearts get 0.40-0.47)
_CTR = {"mild": (0.57, 0.60), "moderate": (0.64, 0.67), "severe": (0.71, 0.74)}

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRIDS:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        _GRIDS[size] = (c[:, None], c[None, :])
    return _GRIDS[size]


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside."""
    return np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)


def _soft(r: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (r < 1), 0 outside, with a linear edge of relative width `edge`."""
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: random cells upsampled bicubically."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


@dataclass
class Anatomy:
    cx: float  # midline
    lung_cy: float
    lung_ry: float
    lung_rx: float
    lung_dx: float  # lung centre offset from the midline
    dome_y: float  # diaphragm dome apex
    body_rx: float
    ctr: float  # cardiothoracic ratio to draw
    gain: float
    gamma: float


def sample_anatomy(rng: np.random.Generator, findings: list[Finding]) -> Anatomy:
    card = next((f for f in findings if f.kind == "cardiomegaly"), None)
    ctr = rng.uniform(*_CTR[card.severity]) if card else rng.uniform(0.40, 0.47)
    return Anatomy(
        cx=0.5 + rng.normal(0, 0.012),
        lung_cy=0.45 + rng.normal(0, 0.012),
        lung_ry=rng.uniform(0.27, 0.31),
        lung_rx=rng.uniform(0.125, 0.14),
        lung_dx=rng.uniform(0.165, 0.18),
        dome_y=rng.uniform(0.66, 0.70),
        body_rx=rng.uniform(0.42, 0.47),
        ctr=ctr,
        gain=rng.uniform(0.9, 1.1),
        gamma=rng.uniform(0.85, 1.15),
    )


def _finish(img: np.ndarray, a: Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
    img = img + 0.018 * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img * a.gain, 0.0, 1.0) ** a.gamma
    pil = Image.fromarray((img * 255.0 + 0.5).astype(np.uint8))
    return pil.filter(ImageFilter.GaussianBlur(radius=max(0.4, size / 320)))


def draw_frontal(findings: list[Finding], a: Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
    """Draws a PA view (patient's right on the image's left)."""
    yy, xx = _grid(size)
    edge = 3.0 / size
    img = np.full((size, size), 0.04, dtype=np.float32)
    # body: shoulders/thorax ellipse + neck
    body = _soft(_ellipse(yy, xx, 0.70, a.cx, 0.62, a.body_rx), edge * 4)
    neck = _soft(_ellipse(yy, xx, 0.0, a.cx, 0.16, 0.09), edge * 4)
    img += 0.30 * np.maximum(body, neck)
    # mediastinum + spine
    spine = np.clip(1.0 - np.abs(xx - a.cx) / 0.045, 0, 1) * (yy > 0.05)
    img += 0.22 * np.minimum(spine * 2.5, 1.0)
    vert = ((yy * 28.0) % 1.0 < 0.2) * (np.abs(xx - a.cx) < 0.03)
    img -= 0.05 * vert
    # lungs, each clipped by its diaphragm dome
    lungs = {}
    dome = {}
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        lcx = a.cx + sgn * a.lung_dx
        r = _ellipse(yy, xx, a.lung_cy, lcx, a.lung_ry, a.lung_rx)
        # flatten the medial border a little (mediastinum)
        medial = np.clip((sgn * (xx - a.cx) - 0.05) / 0.02, 0, 1)
        d = a.dome_y + 0.07 * ((xx - lcx) / a.lung_rx) ** 2 + (0.015 if side == "left" else 0.0)
        dome[side] = d
        below = np.clip((d - yy) / edge + 0.5, 0, 1)
        lungs[side] = _soft(r, edge / a.lung_rx) * below * medial
    lung = np.maximum(lungs["right"], lungs["left"])
    markings = _smooth_noise(rng, size, 24) * 0.035 + _smooth_noise(rng, size, 60) * 0.02
    hilum = np.exp(-(((xx - a.cx) / 0.16) ** 2) - ((yy - 0.45) / 0.15) ** 2)
    lung_val = 0.10 + markings + 0.07 * hilum
    # abdomen below the domes: dense soft tissue
    below_dome = (yy > np.minimum(dome["right"], dome["left"]) + 0.01) * body
    img += 0.20 * below_dome
    img = img * (1 - lung) + lung_val * lung

    # pneumothorax: the lung collapses towards the hilum leaving a dark rim without markings
    for f in findings:
        if f.kind != "pneumothorax":
            continue
        sgn = -1.0 if f.side == "right" else 1.0
        lcx = a.cx + sgn * a.lung_dx
        scale = rng.uniform(0.62, 0.72)
        ccx = lcx - sgn * a.lung_rx * (1 - scale) * 0.9
        ccy = a.lung_cy + a.lung_ry * (1 - scale) * 0.8
        rc = _ellipse(yy, xx, ccy, ccx, a.lung_ry * scale, a.lung_rx * scale)
        m = lungs[f.side]
        collapsed = _soft(rc, edge / (a.lung_rx * scale))
        rim = m * (1 - collapsed)
        img = img * (1 - rim) + 0.015 * rim
        line = np.clip(1.0 - np.abs(rc - 1.0) / (1.6 / (size * a.lung_rx * scale)), 0, 1) * m
        img += 0.22 * line
        img += 0.04 * collapsed * m  # the collapsed lung is a little denser

    # ribs: periodic curved bands across each hemithorax
    for sgn in (-1.0, 1.0):
        lcx = a.cx + sgn * a.lung_dx
        curve = 0.09 * ((xx - lcx) / a.lung_rx + sgn * 0.8) ** 2 * 0.35
        phase = (yy - curve - 0.17) / 0.062
        band = (phase % 1.0 < 0.24) * (phase > 0) * (phase < 9.5)
        ribcage = _soft(_ellipse(yy, xx, a.lung_cy, lcx, a.lung_ry * 1.06, a.lung_rx * 1.12), 0.05)
        img += 0.085 * band * ribcage

    # heart: an ellipse left of the midline whose width is ctr * chest width
    chest_w = 2 * (a.lung_dx + a.lung_rx)
    hw = a.ctr * chest_w
    hcx = a.cx + 0.18 * hw
    hcy = a.dome_y - 0.07
    heart = _soft(_ellipse(yy, xx, hcy, hcx, 0.12 + 0.1 * (a.ctr - 0.45), hw / 2), edge / (hw / 2))
    heart *= yy < a.dome_y + 0.03
    img = img * (1 - heart) + (0.55 + 0.04 * markings) * heart

    for f in findings:
        if f.kind == "effusion":
            sides = SIDES if f.side == "bilateral" else (f.side,)
            for side in sides:
                sgn = -1.0 if side == "right" else 1.0
                lcx = a.cx + sgn * a.lung_dx
                lung_bottom = a.lung_cy + a.lung_ry
                depth = rng.uniform(0.33, 0.45) * (2 * a.lung_ry)
                level = lung_bottom - depth
                # meniscus: higher laterally
                lateral = np.clip(sgn * (xx - lcx) / a.lung_rx, -1, 1.2)
                meniscus = level + 0.05 - 0.07 * lateral
                region = np.clip((yy - meniscus) / (edge * 2) + 0.5, 0, 1)
                ribcage = _soft(_ellipse(yy, xx, a.lung_cy, lcx, a.lung_ry * 1.04, a.lung_rx * 1.06), 0.04)
                medial = np.clip((sgn * (xx - a.cx) - 0.04) / 0.02, 0, 1)
                fluid = region * ribcage * medial * (yy < a.dome_y + 0.1)
                img = img * (1 - fluid) + 0.52 * fluid
        elif f.kind == "consolidation":
            sgn = -1.0 if f.side == "right" else 1.0
            lcx = a.cx + sgn * (a.lung_dx + rng.uniform(-0.02, 0.03))
            cy = LOBE_Y[f.location] + rng.normal(0, 0.015)
            rad = rng.uniform(0.085, 0.105)
            blob = _ellipse(yy, xx, cy, lcx, rad * 0.9, rad) + 0.35 * _smooth_noise(rng, size, 10)
            mask = _soft(blob, 0.25) * lungs[f.side]
            img += (0.30 + 0.05 * markings) * mask
        elif f.kind == "nodule":
            sgn = -1.0 if f.side == "right" else 1.0
            ncx = a.cx + sgn * (a.lung_dx + rng.uniform(-0.03, 0.04))
            ncy = ZONE_Y[f.location] + rng.normal(0, 0.012)
            rad = rng.uniform(0.036, 0.044)
            nod = _soft(_ellipse(yy, xx, ncy, ncx, rad, rad), edge / rad * 1.5)
            img += 0.38 * nod
    return _finish(img, a, rng, size)


def draw_lateral(findings: list[Finding], a: Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
    """Draws a lateral view (anterior on the image's left)."""
    yy, xx = _grid(size)
    edge = 3.0 / size
    img = np.full((size, size), 0.04, dtype=np.float32)
    body = _soft(_ellipse(yy, xx, 0.62, 0.52, 0.62, 0.34), edge * 4)
    img += 0.30 * body
    # spine posteriorly
    spine = np.clip(1.0 - np.abs(xx - 0.78) / 0.05, 0, 1)
    vert = ((yy * 24.0) % 1.0 > 0.2) * 1.0
    img += 0.25 * np.minimum(spine * 2.0, 1.0) * (0.7 + 0.3 * vert) * (yy > 0.08)
    # lung field (both lungs superimposed), dome posteriorly lower
    lcx, lcy, lry, lrx = 0.53, a.lung_cy, a.lung_ry * 1.02, 0.22
    r = _ellipse(yy, xx, lcy, lcx, lry, lrx)
    d = a.dome_y + 0.06 * ((xx - 0.45) / lrx) ** 2
    lung = _soft(r, edge / lrx) * np.clip((d - yy) / edge + 0.5, 0, 1) * (xx < 0.74)
    markings = _smooth_noise(rng, size, 24) * 0.035
    img = img * (1 - lung) + (0.12 + markings) * lung
    img += 0.22 * (yy > d + 0.01) * body
    # heart anteriorly, wider with cardiomegaly
    hw = 0.10 + 0.35 * (a.ctr - 0.40)
    heart = _soft(_ellipse(yy, xx, a.dome_y - 0.07, 0.40, 0.13 + 0.1 * (a.ctr - 0.45), hw), edge / hw)
    img = img * (1 - heart) + 0.50 * heart * (yy < a.dome_y + 0.02) + img * heart * (yy >= a.dome_y + 0.02)
    for f in findings:
        if f.kind == "effusion":
            # fluid in the posterior costophrenic sulcus; more with bilateral effusions
            depth = 0.15 if f.side != "bilateral" else 0.21
            level = a.dome_y + 0.08 - depth + 0.10 * (0.74 - xx)
            fluid = (
                np.clip((yy - level) / (edge * 2) + 0.5, 0, 1) * _soft(r, 0.03) * (xx > 0.45) * (xx < 0.74)
            )
            img = img * (1 - fluid) + 0.50 * fluid
        elif f.kind == "nodule":
            ncy = ZONE_Y[f.location] + rng.normal(0, 0.012)
            ncx = rng.uniform(0.5, 0.62)
            rad = 0.035
            img += 0.32 * _soft(_ellipse(yy, xx, ncy, ncx, rad, rad), edge / rad * 1.5) * lung
        elif f.kind == "consolidation":
            cy = LOBE_Y[f.location]
            ccx = 0.5 + (0.08 if f.location == "lower lobe" else 0.0)
            blob = _ellipse(yy, xx, cy, ccx, 0.08, 0.09) + 0.35 * _smooth_noise(rng, size, 10)
            img += 0.25 * _soft(blob, 0.25) * lung
    return _finish(img, a, rng, size)
