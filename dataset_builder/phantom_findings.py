"""What a phantom study shows: the findings vocabulary, `Finding`, and `sample_findings`.

Both the drawing (`phantom_drawing`) and the report text (`phantom_report`) are functions of the sampled
findings, so the text says exactly what the image shows. Twelve kinds, each read by the CheXpert labeler as one
observation (`CHEXPERT_OBSERVATION`: twelve of its fourteen, with No Finding); a study has 0 to 4 of them, each
with its side, severity or location, so that most studies' finding sets (with their attributes) are
combinations no other study shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDES = ("right", "left")
CARDIOMEGALY_SEVERITIES = ("mild", "moderate", "severe")
EFFUSION_SIZES = ("small", "moderate", "large")
PNEUMOTHORAX_SIZES = ("small", "large")
EDEMA_SEVERITIES = ("mild", "moderate")
MEDIASTINUM_SEVERITIES = ("mild", "marked")
DEVICES = ("pacemaker", "central venous catheter", "endotracheal tube")
LOBES = {"right": ("upper lobe", "middle lobe", "lower lobe"), "left": ("upper lobe", "lower lobe")}
ZONES = ("upper", "mid", "lower")
ATELECTASIS_ZONES = ("mid", "lower")
# pleural thickening: an apical cap or a smooth band along the lateral chest wall
PLEURAL_PLACES = ("apical", "lateral")
# the fractured rib (lateral arc) for each zone; the drawing puts it on that rib's band
FRACTURE_RIBS = {"upper": "4th", "mid": "6th", "lower": "8th"}
# vertical centre (fraction of the image height) of each lobe / zone on the frontal view
LOBE_Y = {"upper lobe": 0.30, "middle lobe": 0.47, "lower lobe": 0.60}
ZONE_Y = {"upper": 0.29, "mid": 0.44, "lower": 0.58}

FINDING_KINDS = (
    "cardiomegaly",
    "mediastinum",
    "consolidation",
    "nodule",
    "opacity",
    "atelectasis",
    "edema",
    "effusion",
    "pleural",
    "pneumothorax",
    "fracture",
    "device",
)
# The CheXpert observation each kind's report sentence is labelled with (and only it).
CHEXPERT_OBSERVATION = {
    "cardiomegaly": "Cardiomegaly",
    "mediastinum": "Enlarged Cardiomediastinum",
    "consolidation": "Consolidation",
    "nodule": "Lung Lesion",
    "opacity": "Lung Opacity",
    "atelectasis": "Atelectasis",
    "edema": "Edema",
    "effusion": "Pleural Effusion",
    "pleural": "Pleural Other",
    "pneumothorax": "Pneumothorax",
    "fracture": "Fracture",
    "device": "Support Devices",
}
# how many findings a study has: 0 (normal) to 4
COUNT_PROBABILITIES = (0.12, 0.16, 0.24, 0.24, 0.24)


@dataclass(frozen=True)
class Finding:
    """One drawn abnormality.

    Args:
        kind (`str`): one of `FINDING_KINDS`.
        side (`str`, *optional*): "right" or "left" (the patient's); "bilateral" for effusions and edema; None
            for cardiomegaly, a widened mediastinum and an endotracheal tube.
        severity (`str`, *optional*): cardiomegaly, edema and mediastinal widening severity, effusion and
            pneumothorax size.
        location (`str`, *optional*): the lobe (consolidation), zone (nodule, opacity, atelectasis, fracture),
            place of a pleural thickening (one of `PLEURAL_PLACES`) or device type (one of `DEVICES`).
    """

    kind: str
    side: str | None = None
    severity: str | None = None
    location: str | None = None

    @property
    def mesh(self) -> str:
        """The Kaggle-style MeSH term, e.g. "Pleural Effusion/right/small" or "Cardiomegaly/mild"."""
        k, side, sev, loc = self.kind, self.side, self.severity, self.location
        if k == "cardiomegaly":
            return f"Cardiomegaly/{sev}"
        if k == "mediastinum":
            return f"Mediastinum/widened/{sev}"
        if k == "effusion":
            return f"Pleural Effusion/{side}/{sev}"
        if k == "pneumothorax":
            return f"Pneumothorax/{side}/{sev}"
        if k == "consolidation":
            return f"Consolidation/lung/{loc}/{side}"
        if k == "nodule":
            return f"Nodule/lung/{loc}/{side}"
        if k == "opacity":
            return f"Opacity/lung/{loc}/{side}"
        if k == "pleural":
            return f"Pleural Thickening/{side}/{loc}"
        if k == "atelectasis":
            return f"Pulmonary Atelectasis/lung/{loc}/{side}"
        if k == "edema":
            return f"Pulmonary Edema/bilateral/{sev}"
        if k == "fracture":
            return f"Fractures, Bone/ribs/{loc}/{side}"
        if loc == "pacemaker":
            return f"Pacemaker, Artificial/{side}"
        if loc == "central venous catheter":
            return f"Catheters, Indwelling/{side}"
        return "Tube, Inserted/trachea"

    @property
    def problem(self) -> str:
        """The Kaggle-style Problems term (the MeSH heading without qualifiers)."""
        return self.mesh.split("/")[0]


def _pick(rng: np.random.Generator, options) -> str:
    return options[rng.integers(len(options))]


def _sample_one(kind: str, rng: np.random.Generator, out: list[Finding]) -> Finding | None:
    """One finding of `kind` compatible with those in `out` (None when none is)."""
    if kind == "cardiomegaly":
        return Finding(kind, severity=_pick(rng, CARDIOMEGALY_SEVERITIES))
    if kind == "mediastinum":
        return Finding(kind, severity=_pick(rng, MEDIASTINUM_SEVERITIES))
    if kind == "edema":
        return Finding(kind, side="bilateral", severity=_pick(rng, EDEMA_SEVERITIES))
    if kind == "effusion":
        side = ("right", "left", "bilateral")[rng.choice(3, p=[0.38, 0.38, 0.24])]
        return Finding(kind, side=side, severity=_pick(rng, EFFUSION_SIZES))
    if kind == "pneumothorax":
        # never on the side of an effusion (a hydropneumothorax would be another finding)
        eff = next((f.side for f in out if f.kind == "effusion"), None)
        sides = [s for s in SIDES if eff not in (s, "bilateral")]
        return (
            Finding(kind, side=_pick(rng, sides), severity=_pick(rng, PNEUMOTHORAX_SIZES)) if sides else None
        )
    if kind == "device":
        device = _pick(rng, DEVICES)
        return Finding(
            kind, side=None if device == "endotracheal tube" else _pick(rng, SIDES), location=device
        )
    if kind == "fracture":
        return Finding(kind, side=_pick(rng, SIDES), location=_pick(rng, ZONES))
    if kind == "pleural":
        return Finding(kind, side=_pick(rng, SIDES), location=_pick(rng, PLEURAL_PLACES))
    # lung findings: one per side and level, so that none hides another
    side = _pick(rng, SIDES)
    if kind == "consolidation":
        options = [lobe for lobe in LOBES[side] if (side, _LEVEL[lobe]) not in _levels(out)]
    else:
        zones = ATELECTASIS_ZONES if kind == "atelectasis" else ZONES
        options = [z for z in zones if (side, z) not in _levels(out)]
    return Finding(kind, side=side, location=_pick(rng, options)) if options else None


_LEVEL = {"upper lobe": "upper", "middle lobe": "mid", "lower lobe": "lower", **{z: z for z in ZONES}}


def _levels(findings: list[Finding]) -> set[tuple[str, str]]:
    """The (side, level) of the lung findings already sampled."""
    return {
        (f.side, _LEVEL[f.location])
        for f in findings
        if f.kind in ("consolidation", "nodule", "opacity", "atelectasis")
    }


def sample_findings(rng: np.random.Generator) -> list[Finding]:
    """Draws 0 (normal, ~12%) to 4 compatible findings of different kinds, in `FINDING_KINDS` order."""
    n = int(rng.choice(len(COUNT_PROBABILITIES), p=COUNT_PROBABILITIES))
    kinds = sorted(rng.choice(len(FINDING_KINDS), size=n, replace=False))
    out: list[Finding] = []
    for k in kinds:
        finding = _sample_one(FINDING_KINDS[k], rng, out)
        if finding is not None:
            out.append(finding)
    return out


def finding_key(findings: list[Finding]) -> frozenset[str]:
    """A study's finding set with its attributes (the MeSH terms): equal keys draw the same findings."""
    return frozenset(f.mesh for f in findings)
