"""Synthetic "phantom" chest radiographs in the Kaggle Indiana layout.

The phantoms are crude but anatomical: a body outline, two lungs with vascular markings, ribs, a
mediastinum and spine, a heart and diaphragm domes, on a frontal (PA) and a lateral view. Findings are
drawn so that they are clearly visible even at 128 px, and the report text is written from exactly what
was drawn, so a model can only describe side and severity by looking at the image:

- cardiomegaly (heart width vs chest width: normal ~0.45, mild ~0.58, moderate ~0.66, severe ~0.74),
- pleural effusion (left / right / bilateral: fluid fills the lung base and blunts the costophrenic angle),
- pneumothorax (left / right: a dark rim without lung markings and a bright visceral pleural line),
- focal consolidation (side and lobe: a dense, irregular airspace opacity),
- nodule (side and zone: a round, sharply marginated density),
- normal studies (about 30%).

Frontal views follow the radiological convention: the patient's right is on the image's left.

Everything is deterministic from ``seed``: each study draws from its own ``numpy`` generator seeded with
``(seed, study_index)``, so the output does not depend on the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

REPORTS_COLUMNS = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
PROJECTIONS_COLUMNS = ["uid", "filename", "projection"]

SIDES = ("right", "left")
CARDIOMEGALY_SEVERITIES = ("mild", "moderate", "severe")
# heart width / chest width drawn for each severity (normal hearts get 0.40-0.47)
_CTR = {"mild": (0.57, 0.60), "moderate": (0.64, 0.67), "severe": (0.71, 0.74)}
LOBES = {"right": ("upper lobe", "middle lobe", "lower lobe"), "left": ("upper lobe", "lower lobe")}
ZONES = ("upper", "mid", "lower")
# vertical centre (fraction of the image height) of each lobe / zone on the frontal view
_LOBE_Y = {"upper lobe": 0.30, "middle lobe": 0.47, "lower lobe": 0.60}
_ZONE_Y = {"upper": 0.29, "mid": 0.44, "lower": 0.58}

FINDING_KINDS = ("cardiomegaly", "effusion", "pneumothorax", "consolidation", "nodule")
_KIND_WEIGHTS = np.array([0.22, 0.22, 0.18, 0.18, 0.20])
NORMAL_FRACTION = 0.30


@dataclass
class Finding:
    """One drawn abnormality.

    Args:
        kind (`str`): one of `FINDING_KINDS`.
        side (`str`, *optional*): "right", "left" or "bilateral" (effusion only); None for cardiomegaly.
        severity (`str`, *optional*): cardiomegaly severity ("mild" | "moderate" | "severe").
        location (`str`, *optional*): the lobe (consolidation) or zone (nodule).
    """

    kind: str
    side: str | None = None
    severity: str | None = None
    location: str | None = None

    @property
    def mesh(self) -> str:
        """The Kaggle-style MeSH term, e.g. "Pleural Effusion/right" or "Cardiomegaly/mild"."""
        if self.kind == "cardiomegaly":
            return f"Cardiomegaly/{self.severity}"
        if self.kind == "effusion":
            return f"Pleural Effusion/{self.side}"
        if self.kind == "pneumothorax":
            return f"Pneumothorax/{self.side}"
        if self.kind == "consolidation":
            return f"Consolidation/lung/{self.location}/{self.side}"
        return f"Nodule/lung/{self.location}/{self.side}"

    @property
    def problem(self) -> str:
        """The Kaggle-style Problems term (the MeSH heading without qualifiers)."""
        return self.mesh.split("/")[0]


@dataclass
class Study:
    """A phantom study: what is drawn and what the report says."""

    uid: int
    findings_list: list[Finding] = field(default_factory=list)
    findings: str = ""
    impression: str = ""
    indication: str = ""

    @property
    def mesh(self) -> str:
        return ";".join(f.mesh for f in self.findings_list) or "normal"

    @property
    def problems(self) -> str:
        return ";".join(dict.fromkeys(f.problem for f in self.findings_list)) or "normal"


# --------------------------------------------------------------------------------------------------
# Sampling what to draw
# --------------------------------------------------------------------------------------------------


def sample_findings(rng: np.random.Generator) -> list[Finding]:
    """Draws 0 (normal, ~30%), 1 or 2 compatible findings."""
    if rng.random() < NORMAL_FRACTION:
        return []
    n = 1 if rng.random() < 0.6 else 2
    kinds = list(rng.choice(len(FINDING_KINDS), size=n, replace=False, p=_KIND_WEIGHTS))
    out: list[Finding] = []
    for k in sorted(kinds):
        kind = FINDING_KINDS[k]
        if kind == "cardiomegaly":
            out.append(Finding(kind, severity=CARDIOMEGALY_SEVERITIES[rng.integers(3)]))
        elif kind == "effusion":
            out.append(
                Finding(kind, side=("right", "left", "bilateral")[rng.choice(3, p=[0.38, 0.38, 0.24])])
            )
        elif kind == "pneumothorax":
            # never on the side of an effusion (a hydropneumothorax would be another finding)
            eff = next((f.side for f in out if f.kind == "effusion"), None)
            choices = [s for s in SIDES if eff not in (s, "bilateral")] or list(SIDES)
            if eff == "bilateral":
                continue
            out.append(Finding(kind, side=choices[rng.integers(len(choices))]))
        elif kind == "consolidation":
            side = SIDES[rng.integers(2)]
            out.append(Finding(kind, side=side, location=LOBES[side][rng.integers(len(LOBES[side]))]))
        else:
            side = SIDES[rng.integers(2)]
            # keep a nodule away from a consolidation on the same side and level
            cons = next((f for f in out if f.kind == "consolidation"), None)
            zones = [
                z
                for z in ZONES
                if cons is None or cons.side != side or abs(_ZONE_Y[z] - _LOBE_Y[cons.location]) > 0.1
            ]
            out.append(Finding(kind, side=side, location=zones[rng.integers(len(zones))]))
    return out


# --------------------------------------------------------------------------------------------------
# Report writing: the text is a function of the drawn findings (plus paraphrase choice)
# --------------------------------------------------------------------------------------------------

_HEART_NORMAL = (
    "Heart size is normal.",
    "The heart is normal in size.",
    "Normal cardiac silhouette.",
    "The cardiomediastinal silhouette is within normal limits.",
    "Heart size and mediastinal contours are within normal limits.",
)
_HEART_ENLARGED = (
    "The heart is {adv} enlarged.",
    "Heart size is {adv} enlarged.",
    "There is {sev} cardiomegaly.",
    "{Sev} cardiomegaly.",
)
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_LUNGS_CLEAR = (
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "No focal consolidation.",
    "There is no focal airspace consolidation.",
    "The lungs are clear without focal consolidation.",
)
_NO_CONSOLIDATION = ("No focal consolidation.", "There is no focal airspace consolidation.")
_CONSOLIDATION = (
    "There is focal consolidation in the {side} {lobe}.",
    "Focal airspace consolidation in the {side} {lobe}.",
    "Airspace opacity in the {side} {lobe} consistent with consolidation.",
    "{Side} {lobe} consolidation.",
)
_NODULE = (
    "There is a {cm} cm nodule in the {side} {zone} lung zone.",
    "A {cm} cm nodule is seen in the {side} {zone} lung.",
    "{Side} {zone} lung nodule measuring {cm} cm.",
)
_NO_PTX_NO_EFF = (
    "No pneumothorax or pleural effusion.",
    "There is no pneumothorax or pleural effusion.",
    "No pleural effusion or pneumothorax.",
    "No pneumothorax or large pleural effusion.",
)
_NO_PTX = ("No pneumothorax.", "There is no pneumothorax.")
_NO_EFF = ("No pleural effusion.", "There is no pleural effusion.")
_EFFUSION = (
    "There is a {side} pleural effusion.",
    "{Side} pleural effusion with blunting of the costophrenic angle.",
    "Moderate {side} pleural effusion.",
    "{Side} pleural effusion is present.",
)
_EFFUSION_BILATERAL = (
    "There are bilateral pleural effusions.",
    "Bilateral pleural effusions with blunting of the costophrenic angles.",
    "Moderate bilateral pleural effusions.",
)
_PNEUMOTHORAX = (
    "There is a {side} pneumothorax.",
    "{Side} pneumothorax with a visible pleural line.",
    "{Side}-sided pneumothorax.",
    "A {side} apical pneumothorax is present.",
)
_BONES = (
    "The osseous structures are intact.",
    "No acute bony abnormality.",
    "Visualized XXXX of the chest are within normal limits.",
    "XXXX are intact.",
    "Degenerative changes of the thoracic spine.",
    "",
    "",
)
_IMPRESSION_NORMAL = (
    "No acute cardiopulmonary abnormality.",
    "No acute cardiopulmonary abnormality. XXXX chest.",
    "No acute cardiopulmonary abnormality identified.",
)
_INDICATIONS = (
    "Chest pain.",
    "Shortness of breath.",
    "XXXX-year-old male with cough.",
    "XXXX-year-old female, dyspnea.",
    "Fever and cough.",
    "Preoperative evaluation.",
    "Follow-up.",
    "XXXX with chest pain for XXXX days.",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _fmt(template: str, **kw: str) -> str:
    caps = {k.capitalize(): v.capitalize() for k, v in kw.items()}
    return template.format(**kw, **caps)


def _finding_phrase(f: Finding, rng: np.random.Generator, cm: str) -> str:
    if f.kind == "cardiomegaly":
        return _fmt(_pick(rng, _HEART_ENLARGED), adv=_ADVERB[f.severity], sev=f.severity)
    if f.kind == "effusion":
        if f.side == "bilateral":
            return _pick(rng, _EFFUSION_BILATERAL)
        return _fmt(_pick(rng, _EFFUSION), side=f.side)
    if f.kind == "pneumothorax":
        return _fmt(_pick(rng, _PNEUMOTHORAX), side=f.side)
    if f.kind == "consolidation":
        return _fmt(_pick(rng, _CONSOLIDATION), side=f.side, lobe=f.location)
    return _fmt(_pick(rng, _NODULE), side=f.side, zone=f.location, cm=cm)


def write_report(
    findings: list[Finding], rng: np.random.Generator, nodule_cm: str = "1.5"
) -> tuple[str, str]:
    """Writes (findings, impression) text for the drawn findings.

    Sentences go heart, lungs, pleura, bones; absent findings are negated, present ones described with
    their side / severity / location. The impression lists the positives (or says the study is normal).
    """
    by_kind = {f.kind: f for f in findings}
    sentences: list[str] = []
    # heart
    if "cardiomegaly" in by_kind:
        sentences.append(_finding_phrase(by_kind["cardiomegaly"], rng, nodule_cm))
    else:
        sentences.append(_pick(rng, _HEART_NORMAL))
    # lungs
    lung_pos = [by_kind[k] for k in ("consolidation", "nodule") if k in by_kind]
    if not lung_pos:
        sentences.append(_pick(rng, _LUNGS_CLEAR))
    else:
        sentences.extend(_finding_phrase(f, rng, nodule_cm) for f in lung_pos)
        if "consolidation" not in by_kind:
            sentences.append(_pick(rng, _NO_CONSOLIDATION))
    # pleura
    ptx, eff = by_kind.get("pneumothorax"), by_kind.get("effusion")
    if ptx is None and eff is None:
        sentences.append(_pick(rng, _NO_PTX_NO_EFF))
    else:
        for f in (eff, ptx):
            if f is not None:
                sentences.append(_finding_phrase(f, rng, nodule_cm))
        if ptx is None:
            sentences.append(_pick(rng, _NO_PTX))
        if eff is None:
            sentences.append(_pick(rng, _NO_EFF))
    bones = _pick(rng, _BONES)
    if bones:
        sentences.append(bones)
    findings_text = " ".join(sentences)

    if not findings:
        impression = _pick(rng, _IMPRESSION_NORMAL)
    else:
        parts = []
        for f in findings:
            if f.kind == "cardiomegaly":
                parts.append(f"{f.severity.capitalize()} cardiomegaly.")
            elif f.kind == "effusion":
                parts.append(
                    "Bilateral pleural effusions."
                    if f.side == "bilateral"
                    else f"{f.side.capitalize()} pleural effusion."
                )
            elif f.kind == "pneumothorax":
                parts.append(f"{f.side.capitalize()} pneumothorax.")
            elif f.kind == "consolidation":
                parts.append(f"{f.side.capitalize()} {f.location} consolidation.")
            else:
                parts.append(f"{f.side.capitalize()} {f.location} lung nodule.")
        order = rng.permutation(len(parts)) if rng.random() < 0.3 else range(len(parts))
        impression = " ".join(parts[i] for i in order)
    return findings_text, impression


# --------------------------------------------------------------------------------------------------
# Drawing (vectorised numpy on a [0, 1] coordinate grid; y down, x right)
# --------------------------------------------------------------------------------------------------

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
class _Anatomy:
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


def _sample_anatomy(rng: np.random.Generator, findings: list[Finding]) -> _Anatomy:
    card = next((f for f in findings if f.kind == "cardiomegaly"), None)
    ctr = rng.uniform(*_CTR[card.severity]) if card else rng.uniform(0.40, 0.47)
    return _Anatomy(
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


def _finish(img: np.ndarray, a: _Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
    img = img + 0.018 * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img * a.gain, 0.0, 1.0) ** a.gamma
    pil = Image.fromarray((img * 255.0 + 0.5).astype(np.uint8))
    return pil.filter(ImageFilter.GaussianBlur(radius=max(0.4, size / 320)))


def draw_frontal(findings: list[Finding], a: _Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
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
            cy = _LOBE_Y[f.location] + rng.normal(0, 0.015)
            rad = rng.uniform(0.085, 0.105)
            blob = _ellipse(yy, xx, cy, lcx, rad * 0.9, rad) + 0.35 * _smooth_noise(rng, size, 10)
            mask = _soft(blob, 0.25) * lungs[f.side]
            img += (0.30 + 0.05 * markings) * mask
        elif f.kind == "nodule":
            sgn = -1.0 if f.side == "right" else 1.0
            ncx = a.cx + sgn * (a.lung_dx + rng.uniform(-0.03, 0.04))
            ncy = _ZONE_Y[f.location] + rng.normal(0, 0.012)
            rad = rng.uniform(0.036, 0.044)
            nod = _soft(_ellipse(yy, xx, ncy, ncx, rad, rad), edge / rad * 1.5)
            img += 0.38 * nod
    return _finish(img, a, rng, size)


def draw_lateral(findings: list[Finding], a: _Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
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
            ncy = _ZONE_Y[f.location] + rng.normal(0, 0.012)
            ncx = rng.uniform(0.5, 0.62)
            rad = 0.035
            img += 0.32 * _soft(_ellipse(yy, xx, ncy, ncx, rad, rad), edge / rad * 1.5) * lung
        elif f.kind == "consolidation":
            cy = _LOBE_Y[f.location]
            ccx = 0.5 + (0.08 if f.location == "lower lobe" else 0.0)
            blob = _ellipse(yy, xx, cy, ccx, 0.08, 0.09) + 0.35 * _smooth_noise(rng, size, 10)
            img += 0.25 * _soft(blob, 0.25) * lung
    return _finish(img, a, rng, size)


# --------------------------------------------------------------------------------------------------
# Studies and files
# --------------------------------------------------------------------------------------------------


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_study(index: int, seed: int, image_size: int) -> tuple[Study, list[tuple[str, str, bytes]]]:
    """Builds study number `index` (uid = index + 1): its report and its (filename, projection, png) images."""
    rng = np.random.default_rng([seed, index])
    uid = index + 1
    findings = sample_findings(rng)
    anatomy = _sample_anatomy(rng, findings)
    nodule_cm = f"{rng.uniform(1.2, 2.2):.1f}"
    findings_text, impression = write_report(findings, rng, nodule_cm)
    study = Study(uid, findings, findings_text, impression, _pick(rng, _INDICATIONS))
    img_rng = np.random.default_rng([seed, index, 1])
    series = 1000 + index
    frontal = draw_frontal(findings, anatomy, img_rng, image_size)
    lateral = draw_lateral(findings, anatomy, img_rng, image_size)
    images = [
        (f"{uid}_IM-{series:04d}-1001.dcm.png", "Frontal", _png_bytes(frontal)),
        (f"{uid}_IM-{series:04d}-2001.dcm.png", "Lateral", _png_bytes(lateral)),
    ]
    return study, images


def _make_chunk(args: tuple[list[int], int, int, str]) -> list[tuple[Study, list[tuple[str, str]]]]:
    indices, seed, image_size, image_dir = args
    out = []
    for i in indices:
        study, images = make_study(i, seed, image_size)
        for filename, _, data in images:
            with open(os.path.join(image_dir, filename), "wb") as fh:
                fh.write(data)
        out.append((study, [(fn, proj) for fn, proj, _ in images]))
    return out


def _write_csv_atomic(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def synthesize(
    output_dir: str | os.PathLike,
    num_studies: int = 2000,
    seed: int = 0,
    image_size: int = 256,
    num_proc: int | None = None,
) -> Path:
    """Writes phantom chest X-ray studies in the Kaggle Indiana layout.

    Writes `indiana_reports.csv`, `indiana_projections.csv` and `images/images_normalized/*.png`
    (a frontal and a lateral 8-bit grayscale PNG per study). The MeSH and Problems columns hold the
    true drawn findings (e.g. "Pleural Effusion/right;Cardiomegaly/mild", or "normal").

    Args:
        output_dir (`str` or `os.PathLike`): folder to write (created if needed).
        num_studies (`int`, defaults to 2000): number of studies (uids 1..num_studies).
        seed (`int`, defaults to 0): the same seed gives byte-identical CSVs and images.
        image_size (`int`, defaults to 256): side of the square PNGs in pixels.
        num_proc (`int`, *optional*): worker processes; defaults to the CPU count for >= 200 studies.
            The output does not depend on it.

    Returns:
        `Path`: the output folder, ready for `build_dataset(data_dir=...)`.
    """
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 px for visible findings, got {image_size}")
    out = Path(output_dir)
    image_dir = out / "images" / "images_normalized"
    image_dir.mkdir(parents=True, exist_ok=True)
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if num_studies >= 200 else 1
    chunk = 50
    jobs = [
        (list(range(s, min(s + chunk, num_studies))), seed, image_size, str(image_dir))
        for s in range(0, num_studies, chunk)
    ]
    results: list[tuple[Study, list[tuple[str, str]]]] = []
    bar = tqdm(total=num_studies, desc="Synthesizing phantom studies", unit="study")
    if num_proc > 1:
        with ProcessPoolExecutor(max_workers=num_proc) as pool:
            for part in pool.map(_make_chunk, jobs):
                results.extend(part)
                bar.update(len(part))
    else:
        for job in jobs:
            part = _make_chunk(job)
            results.extend(part)
            bar.update(len(part))
    bar.close()

    # CSVs last and atomically (projections last of all): a folder with indiana_projections.csv is complete
    report_rows = [
        [
            s.uid,
            s.mesh,
            s.problems,
            "Xray Chest PA and Lateral",
            s.indication,
            "None.",
            s.findings,
            s.impression,
        ]
        for s, _ in results
    ]
    _write_csv_atomic(out / "indiana_reports.csv", REPORTS_COLUMNS, report_rows)
    projection_rows = [[s.uid, fn, proj] for s, images in results for fn, proj in images]
    _write_csv_atomic(out / "indiana_projections.csv", PROJECTIONS_COLUMNS, projection_rows)
    logger.info("Wrote %d phantom studies (%d images) to %s", num_studies, 2 * num_studies, out)
    return out
