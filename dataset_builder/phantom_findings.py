"""What a phantom study shows: the findings vocabulary, `Finding`, and `sample_findings`.

Both the drawing (`phantom_drawing`) and the report text (`phantom_report`) are functions of the sampled
findings, so the text says exactly what the image shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDES = ("right", "left")
CARDIOMEGALY_SEVERITIES = ("mild", "moderate", "severe")
# heart width / chest width drawn for each severity (normal hearts get 0.40-0.47)
LOBES = {"right": ("upper lobe", "middle lobe", "lower lobe"), "left": ("upper lobe", "lower lobe")}
ZONES = ("upper", "mid", "lower")
# vertical centre (fraction of the image height) of each lobe / zone on the frontal view
LOBE_Y = {"upper lobe": 0.30, "middle lobe": 0.47, "lower lobe": 0.60}
ZONE_Y = {"upper": 0.29, "mid": 0.44, "lower": 0.58}

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
                if cons is None or cons.side != side or abs(ZONE_Y[z] - LOBE_Y[cons.location]) > 0.1
            ]
            out.append(Finding(kind, side=side, location=zones[rng.integers(len(zones))]))
    return out
