"""Drawing phantom chest radiographs: vectorised numpy on a [0, 1] coordinate grid (y down, x right).

A body outline, two lungs with vascular markings, ribs, a mediastinum and spine, a heart and diaphragm domes,
on a frontal (PA) and a lateral view, with each finding drawn the way a radiologist recognises it, visible
even at 128 px:

- cardiomegaly (heart width vs chest width: normal ~0.45, mild ~0.58, moderate ~0.66, severe ~0.74),
- a widened mediastinum (the upper mediastinum pushes the lungs' medial borders outwards),
- lobar consolidation (dense and homogeneous with dark air bronchograms; the right upper and middle lobes meet
  at the sharp horizontal fissure), nodule (a round, sharply marginated density),
- patchy lung opacity (ill-defined, mottled and fainter than a consolidation, with no border, over one zone),
- pleural thickening (a smooth bright band inside the chest wall: an apical cap, or along the whole lateral
  wall from below the apex to the costophrenic angle, unlike the focal callus of a fracture),
- plate-like atelectasis (a thin horizontal band, with volume loss: that hemidiaphragm rises),
- edema (a bilateral perihilar haze, patchy, fading towards the periphery),
- pleural effusion (fluid fills the lung base and blunts the costophrenic angle; small, moderate, large),
- pneumothorax (a dark rim without lung markings and a bright visceral pleural line; small or large),
- a healing rib fracture (a bright focal callus split by a lucent line, with a step-off, across the lateral
  arc of one rib),
- support devices, bright as metal: a pacemaker (generator below the clavicle, leads into the heart), a
  central venous catheter (from the neck to the superior vena cava), an endotracheal tube (in the trachea).

The lateral view shows what a lateral would: both lungs superimposed (no side), the heart anteriorly, fluid
in the posterior sulcus, the devices and the anterior mediastinum; rib fractures, pneumothoraces and pleural
thickening, hidden on a lateral, are not drawn there. Frontal views follow the radiological convention: the
patient's right is on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .phantom_findings import LOBE_Y, SIDES, ZONE_Y, Finding

# heart width / chest width drawn for each severity (normal hearts get 0.40-0.47)
_CTR = {"mild": (0.57, 0.60), "moderate": (0.64, 0.67), "severe": (0.71, 0.74)}

# extra half-width of the upper mediastinum (normal: the lungs' medial borders 0.05 from the midline)
_WIDENING = {"mild": (0.06, 0.07), "marked": (0.09, 0.105)}
_EFFUSION_DEPTH = {"small": (0.22, 0.27), "moderate": (0.33, 0.39), "large": (0.48, 0.55)}  # of lung height
_PTX_SCALE = {"small": (0.72, 0.76), "large": (0.58, 0.64)}  # collapsed lung / lung size
_EDEMA_DENSITY = {"mild": 0.22, "moderate": 0.32}
_RIB_INDEX = {"upper": 2, "mid": 4, "lower": 6}  # the rib band of a fracture in each zone
_METAL = 0.55  # brightness added by a device

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
    mediastinum_widening: float = 0.0  # added to each half-width of the upper mediastinum
    dome_rise: tuple[float, float] = (0.0, 0.0)  # (right, left) hemidiaphragm elevation (volume loss)


def sample_anatomy(rng: np.random.Generator, findings: list[Finding]) -> Anatomy:
    card = next((f for f in findings if f.kind == "cardiomegaly"), None)
    ctr = rng.uniform(*_CTR[card.severity]) if card else rng.uniform(0.40, 0.47)
    wide = next((f for f in findings if f.kind == "mediastinum"), None)
    collapsed = {f.side for f in findings if f.kind == "atelectasis"}
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
        mediastinum_widening=rng.uniform(*_WIDENING[wide.severity]) if wide else 0.0,
        dome_rise=tuple(0.045 if side in collapsed else 0.0 for side in SIDES),
    )


def _finish(img: np.ndarray, a: Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
    img = img + 0.018 * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img * a.gain, 0.0, 1.0) ** a.gamma
    pil = Image.fromarray((img * 255.0 + 0.5).astype(np.uint8))
    return pil.filter(ImageFilter.GaussianBlur(radius=max(0.4, size / 320)))


def _polyline(size: int, points: list[tuple[float, float]], width: float) -> np.ndarray:
    """A [0, 1] mask of the polyline through `points` ((x, y) in image fractions), `width` a fraction too."""
    big = 2 * size  # drawn at twice the size, then averaged down: smooth edges
    im = Image.new("L", (big, big), 0)
    xy = [(x * big, y * big) for x, y in points]
    ImageDraw.Draw(im).line(xy, fill=255, width=max(1, round(width * big)), joint="curve")
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def _bezier(p0, p1, p2, n: int = 24) -> list[tuple[float, float]]:
    """Points of the quadratic Bezier curve p0 -> p2 pulled towards p1."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [tuple(p) for p in pts]


def _generator(yy, xx, cy, cx, ry, rx, edge) -> np.ndarray:
    """A pacemaker generator: a rounded rectangle (superellipse)."""
    r = (np.abs((yy - cy) / ry) ** 4 + np.abs((xx - cx) / rx) ** 4) ** 0.25
    return _soft(r, edge / rx)


def _draw_device(img, f: Finding, a: Anatomy, size: int, frontal: bool) -> np.ndarray:
    """A support device, bright as metal, on either view."""
    yy, xx = _grid(size)
    sgn = -1.0 if f.side == "right" else 1.0
    if f.location == "pacemaker":
        if frontal:
            gy, gx = 0.19, a.cx + sgn * 0.25
            ra, rv = (a.cx - 0.035, a.dome_y - 0.15), (a.cx + 0.07, a.dome_y - 0.05)
            start, bend = (gx - sgn * 0.03, gy + 0.01), (a.cx + sgn * 0.06, 0.20)
        else:  # anterior chest wall, leads back into the heart
            gy, gx = 0.21, 0.24
            ra, rv = (0.42, a.dome_y - 0.16), (0.34, a.dome_y - 0.06)
            start, bend = (gx + 0.03, gy + 0.01), (0.40, 0.24)
        img = img + _METAL * _generator(yy, xx, gy, gx, 0.028, 0.042, 3.0 / size)
        for tip in (ra, rv):
            img = img + 0.50 * _polyline(size, _bezier(start, bend, tip), 0.018)
        return img
    if f.location == "central venous catheter":
        if frontal:
            points = _bezier((a.cx + sgn * 0.14, 0.0), (a.cx + sgn * 0.06, 0.16), (a.cx + sgn * 0.02, 0.36))
        else:
            points = _bezier((0.50, 0.0), (0.47, 0.16), (0.44, 0.34))
        return img + 0.50 * _polyline(size, points, 0.018)
    # endotracheal tube: down the trachea, its tip above the carina
    x0 = a.cx if frontal else 0.52
    walls = [_polyline(size, [(x0 + d, 0.0), (x0 + d, 0.25)], 0.016) for d in (-0.02, 0.02)]
    return img + 0.60 * np.maximum(*walls) + 0.20 * _polyline(size, [(x0, 0.0), (x0, 0.25)], 0.05)


def _lobe(yy, xx, f: Finding, a: Anatomy, rng, size: int) -> np.ndarray:
    """The part of one lung a lobar consolidation fills, in [0, 1] (the lung mask is applied by the caller).

    On a frontal view the right upper lobe ends below at the horizontal (minor) fissure, a sharp straight edge,
    and the middle lobe begins there and lies against the heart border; the lower lobes fill the base, with an
    ill-defined upper edge (the oblique fissure runs obliquely to the beam). The left upper lobe ends above the
    left lower lobe with a soft edge too.
    """
    sgn = -1.0 if f.side == "right" else 1.0
    lcx = a.cx + sgn * a.lung_dx
    # the right minor fissure; the left lobes part at about the same level
    fissure = 0.40 + rng.normal(0, 0.008)
    irregular = 0.018 * _smooth_noise(rng, size, 12)  # an uneven edge where no fissure bounds the lobe
    if f.location == "upper lobe":
        top = (a.lung_cy - a.lung_ry) + 0.06
        inside = np.clip((yy - top - irregular) / 0.03, 0, 1)
        edge = 0.006 if f.side == "right" else 0.03  # a fissure on the right only
        return inside * np.clip((fissure - yy) / edge + 0.5, 0, 1)
    if f.location == "middle lobe":  # below the minor fissure, the medial half (it effaces the heart border)
        below_fissure = np.clip((yy - fissure) / 0.006 + 0.5, 0, 1)
        above_base = np.clip((fissure + 0.14 - yy + irregular) / 0.03, 0, 1)
        medial = np.clip((0.25 - sgn * (xx - lcx) / a.lung_rx + 10 * irregular) / 0.25, 0, 1)
        return below_fissure * above_base * medial
    top = fissure + 0.09 + irregular  # lower lobe: the base, up to an ill-defined upper edge
    return np.clip((yy - top) / 0.05, 0, 1)


def _air_bronchograms(f: Finding, a: Anatomy, rng, size: int) -> np.ndarray:
    """Dark branching lines of air-filled bronchi, radiating from the hilum into the consolidated lobe."""
    sgn = -1.0 if f.side == "right" else 1.0
    hx, hy = a.cx + sgn * 0.08, 0.45
    target_y = {"upper lobe": 0.27, "middle lobe": 0.49, "lower lobe": 0.62}[f.location]
    mask = np.zeros((size, size), dtype=np.float32)
    for _ in range(3):
        ty = target_y + rng.uniform(-0.05, 0.05)
        tx = a.cx + sgn * (a.lung_dx + a.lung_rx * rng.uniform(0.1, 0.7))
        mid = ((hx + tx) / 2 + rng.uniform(-0.02, 0.02), (hy + ty) / 2 + rng.uniform(-0.03, 0.03))
        mask = np.maximum(mask, _polyline(size, _bezier((hx, hy), mid, (tx, ty)), 0.012))
    return mask


def _draw_lung_finding(img, f: Finding, a: Anatomy, lungs, markings, rng, size: int) -> np.ndarray:
    """Effusion, consolidation, opacity, nodule, atelectasis or pleural thickening on the frontal view."""
    yy, xx = _grid(size)
    edge = 3.0 / size
    sgn = -1.0 if f.side == "right" else 1.0
    if f.kind == "effusion":
        depth_range = _EFFUSION_DEPTH[f.severity]
        for side in SIDES if f.side == "bilateral" else (f.side,):
            sgn = -1.0 if side == "right" else 1.0
            lcx = a.cx + sgn * a.lung_dx
            lung_bottom = a.lung_cy + a.lung_ry
            level = lung_bottom - rng.uniform(*depth_range) * (2 * a.lung_ry)
            # meniscus: higher laterally
            lateral = np.clip(sgn * (xx - lcx) / a.lung_rx, -1, 1.2)
            meniscus = level + 0.05 - 0.07 * lateral
            region = np.clip((yy - meniscus) / (edge * 2) + 0.5, 0, 1)
            ribcage = _soft(_ellipse(yy, xx, a.lung_cy, lcx, a.lung_ry * 1.04, a.lung_rx * 1.06), 0.04)
            medial = np.clip((sgn * (xx - a.cx) - 0.04) / 0.02, 0, 1)
            fluid = region * ribcage * medial * (yy < a.dome_y + 0.1)
            img = img * (1 - fluid) + 0.52 * fluid
    elif f.kind == "consolidation":  # lobar: dense, homogeneous, air bronchograms, a sharp fissural border
        region = _lobe(yy, xx, f, a, rng, size) * lungs[f.side]
        bronchi = _air_bronchograms(f, a, rng, size)
        img = img + (0.36 + 0.03 * markings) * region - 0.16 * bronchi * region
    elif f.kind == "opacity":  # ill-defined, patchy and faint: puffs fading into the lung, no border
        lcx = a.cx + sgn * (a.lung_dx + rng.uniform(-0.01, 0.03))
        cy = ZONE_Y[f.location] + rng.normal(0, 0.012)
        region = _soft(_ellipse(yy, xx, cy, lcx, 0.095, 0.12) + 0.2 * _smooth_noise(rng, size, 8), 0.7)
        mottle = np.clip(0.3 + 1.0 * _smooth_noise(rng, size, 28), 0, 1)
        img = img + 0.26 * region * mottle * lungs[f.side]
    elif f.kind == "pleural":  # a smooth band inside the chest wall: an apical cap, or the whole lateral wall
        lcx = a.cx + sgn * a.lung_dx
        r = _ellipse(yy, xx, a.lung_cy, lcx, a.lung_ry, a.lung_rx)
        if f.location == "apical":
            band = np.clip((r - (1 - 0.075 / a.lung_ry)) / 0.04, 0, 1) * (yy < a.lung_cy - 0.62 * a.lung_ry)
        else:  # from below the apex to the costophrenic angle, even: unlike the focal callus of a fracture
            lateral, below_apex = sgn * (xx - lcx) > 0.3 * a.lung_rx, yy > a.lung_cy - 0.6 * a.lung_ry
            band = np.clip((r - (1 - 0.045 / a.lung_rx)) / 0.04, 0, 1) * lateral * below_apex
        img = img + 0.45 * band * lungs[f.side]
    elif f.kind == "nodule":
        ncx = a.cx + sgn * (a.lung_dx + rng.uniform(-0.03, 0.04))
        ncy = ZONE_Y[f.location] + rng.normal(0, 0.012)
        rad = rng.uniform(0.046, 0.054)
        img = img + 0.45 * _soft(_ellipse(yy, xx, ncy, ncx, rad, rad), edge / rad * 1.5)
    elif f.kind == "atelectasis":
        # a plate-like band, near horizontal, across the mid or lower lung
        bx = a.cx + sgn * (a.lung_dx + rng.uniform(0.035, 0.05))
        by = ZONE_Y[f.location] + rng.normal(0, 0.01) + sgn * 0.10 * (xx - bx)
        band = np.clip(1.0 - np.abs(yy - by) / 0.02, 0, 1) * np.clip((0.08 - np.abs(xx - bx)) / 0.02, 0, 1)
        img = img + 0.36 * band * lungs[f.side]
    return img


def _draw_fracture(img, f: Finding, a: Anatomy, rng, size: int) -> np.ndarray:
    """A healing fracture of one rib's lateral arc, conspicuous at 128 px: a broad, bright fusiform callus over
    the lung, split by a lucent fracture gap with a cortical step-off (the distal fragment sits lower)."""
    yy, xx = _grid(size)
    sgn = -1.0 if f.side == "right" else 1.0
    lcx = a.cx + sgn * a.lung_dx
    fx = lcx + sgn * a.lung_rx * 0.78
    curve = 0.09 * ((fx - lcx) / a.lung_rx + sgn * 0.8) ** 2 * 0.35  # the rib formula of `draw_frontal`
    fy = 0.17 + curve + 0.062 * (_RIB_INDEX[f.location] + 0.12) + rng.normal(0, 0.004)
    across = (xx - fx) - 0.5 * sgn * (yy - fy)  # signed distance across the fracture line
    distal = np.clip(sgn * across / 0.006 + 0.5, 0, 1)  # the lateral fragment
    step = 0.018 * distal  # the step-off: the lateral fragment displaced downwards
    callus = _soft(_ellipse(yy - step, xx, fy, fx, 0.042, 0.075), 0.3)
    gap = np.clip(1.0 - np.abs(across) / 0.011, 0, 1) * callus
    return img + 0.55 * callus - 0.45 * gap


def draw_frontal(findings: list[Finding], a: Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
    """Draws a PA view (patient's right on the image's left)."""
    yy, xx = _grid(size)
    edge = 3.0 / size
    img = np.full((size, size), 0.04, dtype=np.float32)
    # body: shoulders/thorax ellipse + neck
    body = _soft(_ellipse(yy, xx, 0.70, a.cx, 0.62, a.body_rx), edge * 4)
    neck = _soft(_ellipse(yy, xx, 0.0, a.cx, 0.16, 0.09), edge * 4)
    img += 0.30 * np.maximum(body, neck)
    # mediastinum (wider above the heart when widened) + spine
    half = 0.05 + a.mediastinum_widening * np.exp(-(((yy - 0.27) / 0.11) ** 2))
    img += 0.10 * np.clip((half - np.abs(xx - a.cx)) / 0.01, 0, 1) * (yy > 0.08) * (yy < a.dome_y)
    spine = np.clip(1.0 - np.abs(xx - a.cx) / 0.045, 0, 1) * (yy > 0.05)
    img += 0.22 * np.minimum(spine * 2.5, 1.0)
    vert = ((yy * 28.0) % 1.0 < 0.2) * (np.abs(xx - a.cx) < 0.03)
    img -= 0.05 * vert
    # lungs, each clipped by its diaphragm dome and the mediastinum
    lungs = {}
    dome = {}
    for side, sgn, rise in (("right", -1.0, a.dome_rise[0]), ("left", 1.0, a.dome_rise[1])):
        lcx = a.cx + sgn * a.lung_dx
        r = _ellipse(yy, xx, a.lung_cy, lcx, a.lung_ry, a.lung_rx)
        medial = np.clip((sgn * (xx - a.cx) - half) / 0.02, 0, 1)
        d = a.dome_y - rise + 0.07 * ((xx - lcx) / a.lung_rx) ** 2 + (0.015 if side == "left" else 0.0)
        dome[side] = d
        below = np.clip((d - yy) / edge + 0.5, 0, 1)
        lungs[side] = _soft(r, edge / a.lung_rx) * below * medial
    lung = np.maximum(lungs["right"], lungs["left"])
    markings = _smooth_noise(rng, size, 24) * 0.035 + _smooth_noise(rng, size, 60) * 0.02
    hilum = np.exp(-(((xx - a.cx) / 0.16) ** 2) - ((yy - 0.45) / 0.15) ** 2)
    lung_val = 0.10 + markings + 0.07 * hilum
    # abdomen below each side's dome: dense soft tissue
    below_dome = (yy > np.where(xx < a.cx, dome["right"], dome["left"]) + 0.01) * body
    img += 0.20 * below_dome
    img = img * (1 - lung) + lung_val * lung

    for f in findings:
        if f.kind == "edema":  # bilateral perihilar haze, patchy, fading to the periphery
            perihilar = np.exp(-(((np.abs(xx - a.cx) - 0.11) / 0.11) ** 2) - ((yy - 0.46) / 0.16) ** 2)
            patchy = 0.75 + 0.25 * _smooth_noise(rng, size, 16)
            img += _EDEMA_DENSITY[f.severity] * perihilar * patchy * lung
        elif f.kind == "pneumothorax":  # the lung collapses towards the hilum: a dark rim without markings
            sgn = -1.0 if f.side == "right" else 1.0
            lcx = a.cx + sgn * a.lung_dx
            scale = rng.uniform(*_PTX_SCALE[f.severity])
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
    for f in findings:
        if f.kind == "fracture":
            img = _draw_fracture(img, f, a, rng, size)

    # heart: an ellipse left of the midline whose width is ctr * chest width
    chest_w = 2 * (a.lung_dx + a.lung_rx)
    hw = a.ctr * chest_w
    hcx = a.cx + 0.18 * hw
    hcy = a.dome_y - 0.07
    heart = _soft(_ellipse(yy, xx, hcy, hcx, 0.12 + 0.1 * (a.ctr - 0.45), hw / 2), edge / (hw / 2))
    heart *= yy < a.dome_y + 0.03
    img = img * (1 - heart) + (0.55 + 0.04 * markings) * heart

    for f in findings:
        if f.kind in ("effusion", "consolidation", "opacity", "nodule", "atelectasis", "pleural"):
            img = _draw_lung_finding(img, f, a, lungs, markings, rng, size)
    for f in findings:
        if f.kind == "device":
            img = _draw_device(img, f, a, size, frontal=True)
    return _finish(img, a, rng, size)


def draw_lateral(findings: list[Finding], a: Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
    """Draws a lateral view (anterior on the image's left): both lungs superimposed, so no side shows."""
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
    d = a.dome_y - 0.5 * max(a.dome_rise) + 0.06 * ((xx - 0.45) / lrx) ** 2
    lung = _soft(r, edge / lrx) * np.clip((d - yy) / edge + 0.5, 0, 1) * (xx < 0.74)
    markings = _smooth_noise(rng, size, 24) * 0.035
    img = img * (1 - lung) + (0.12 + markings) * lung
    img += 0.22 * (yy > d + 0.01) * body
    # heart anteriorly, wider with cardiomegaly
    hw = 0.10 + 0.35 * (a.ctr - 0.40)
    heart = _soft(_ellipse(yy, xx, a.dome_y - 0.07, 0.40, 0.13 + 0.1 * (a.ctr - 0.45), hw), edge / hw)
    img = img * (1 - heart) + 0.50 * heart * (yy < a.dome_y + 0.02) + img * heart * (yy >= a.dome_y + 0.02)
    if a.mediastinum_widening:  # the anterior mediastinum fills the retrosternal clear space
        fill = _soft(_ellipse(yy, xx, 0.28, 0.36, 0.11, 0.04 + a.mediastinum_widening), 0.2)
        img += 0.16 * fill * lung
    for f in findings:
        if f.kind == "effusion":
            # fluid in the posterior costophrenic sulcus; more with larger or bilateral effusions
            depth = {"small": 0.11, "moderate": 0.15, "large": 0.21}[f.severity]
            depth += 0.04 if f.side == "bilateral" else 0.0
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
        elif f.kind == "opacity":
            region = _soft(_ellipse(yy, xx, ZONE_Y[f.location], 0.55, 0.08, 0.09), 0.7)
            mottle = np.clip(0.45 + 0.8 * _smooth_noise(rng, size, 36), 0, 1)
            img += 0.18 * region * mottle * lung
        elif f.kind == "atelectasis":
            by = ZONE_Y[f.location] + 0.03 + 0.08 * (xx - 0.55)
            band = np.clip(1.0 - np.abs(yy - by) / 0.012, 0, 1) * np.clip(
                (0.11 - np.abs(xx - 0.56)) / 0.02, 0, 1
            )
            img += 0.28 * band * lung
        elif f.kind == "edema":
            haze = np.exp(-(((xx - 0.52) / 0.13) ** 2) - ((yy - 0.46) / 0.15) ** 2)
            img += _EDEMA_DENSITY[f.severity] * haze * (0.75 + 0.25 * _smooth_noise(rng, size, 16)) * lung
        elif f.kind == "device":
            img = _draw_device(img, f, a, size, frontal=False)
    return _finish(img, a, rng, size)
