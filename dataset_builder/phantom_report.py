"""The report text of a phantom study: a function of the drawn findings, plus the choice of paraphrase.

Sentences go devices, heart, mediastinum, lungs, pleura, bones, in the style of the Indiana reports (including
their `XXXX` anonymisation tokens; no sentence is copied from them); absent findings are negated, present ones
described with side, severity and location. Every paraphrase of a finding is read by the CheXpert labeler as
the same single observation, so the labels follow the image, not the choice of words.
"""

from __future__ import annotations

import numpy as np

from .phantom_findings import FRACTURE_RIBS, Finding

_HEART_NORMAL = (
    "Heart size is normal.",
    "The heart is normal in size.",
    "Normal heart size.",
    "The cardiac silhouette is within normal limits.",
)
# said only when the mediastinum is normal too
_HEART_AND_MEDIASTINUM_NORMAL = (
    "The cardiomediastinal silhouette is within normal limits.",
    "Heart size and mediastinal contours are within normal limits.",
    "The heart and mediastinum are within normal limits.",
    "Normal cardiomediastinal silhouette.",
)
_HEART_ENLARGED = (
    "Heart size is {adv} enlarged.",
    "The cardiac silhouette is {adv} enlarged.",
    "There is {sev} cardiomegaly.",
    "{Sev} cardiomegaly.",
)
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely", "marked": "markedly"}
_MEDIASTINUM_WIDENED = (
    "The mediastinum is {adv} widened.",
    "{Sev} widening of the mediastinum.",
    "There is {sev} widening of the mediastinum.",
)
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
    "{Side} {lobe} consolidation.",
)
_NODULE = (
    "There is a {cm} cm nodule in the {side} {zone} lung zone.",
    "A {cm} cm nodule is seen in the {side} {zone} lung.",
    "{Side} {zone} lung nodule measuring {cm} cm.",
)
_OPACITY = (
    "There is ill-defined patchy opacity in the {side} {zone} lung zone.",
    "Patchy airspace opacity in the {side} {zone} lung.",
    "{Side} {zone} lung patchy opacity.",
)
_PLEURAL = {
    "apical": (
        "Smooth {side} apical pleural thickening.",
        "There is {side} apical pleural thickening.",
        "{Side} apical pleural thickening, unchanged in appearance.",
    ),
    "lateral": (
        "Smooth pleural thickening along the {side} lateral chest wall.",
        "There is {side} pleural thickening along the lateral chest wall.",
        "{Side} lateral pleural thickening.",
    ),
}
_ATELECTASIS_PLACE = {"mid": "{side} midlung", "lower": "{side} lung base"}
_ATELECTASIS = (
    "Plate-like atelectasis in the {place} with elevation of the {side} hemidiaphragm.",
    "There is linear atelectasis in the {place} and the {side} hemidiaphragm is elevated.",
    "{Place} plate-like atelectasis with volume loss.",
)
_EDEMA = (
    "There is {sev} pulmonary edema in a perihilar distribution.",
    "{Sev} bilateral perihilar edema.",
    "{Sev} interstitial pulmonary edema, greatest in the perihilar regions.",
)
_NO_PTX_NO_EFF = (
    "No pneumothorax or pleural effusion.",
    "There is no pneumothorax or pleural effusion.",
    "No pleural effusion or pneumothorax.",
)
_NO_PTX = ("No pneumothorax.", "There is no pneumothorax.")
_NO_EFF = ("No pleural effusion.", "There is no pleural effusion.")
_EFFUSION = (
    "There is a {sev} {side} pleural effusion.",
    "{Sev} {side} pleural effusion with blunting of the costophrenic angle.",
    "{Sev} {side} pleural effusion is present.",
)
_EFFUSION_BILATERAL = (
    "There are {sev} bilateral pleural effusions.",
    "{Sev} bilateral pleural effusions with blunting of the costophrenic angles.",
    "{Sev} pleural effusions are present bilaterally.",
)
_PNEUMOTHORAX = (
    "There is a {sev} {side} pneumothorax.",
    "{Sev} {side} pneumothorax with a visible pleural line.",
    "{Sev} {side}-sided pneumothorax.",
)
_FRACTURE = (
    "Healing fracture of the {side} lateral {rib} rib with callus formation.",
    "There is a healing {side} lateral {rib} rib fracture.",
    "Callus about a fracture of the {side} {rib} rib.",
)
_DEVICE = {
    "pacemaker": (
        "{Side} chest wall pacemaker with transvenous leads in satisfactory position.",
        "A {side}-sided pacemaker is present, its leads in expected position.",
        "{Side} subclavian pacemaker generator with two leads.",
    ),
    "central venous catheter": (
        "{Side} internal jugular central venous catheter with tip in the superior vena cava.",
        "A {side}-sided central venous catheter terminates in the superior vena cava.",
        "{Side} jugular catheter, tip projecting over the superior vena cava.",
    ),
    "endotracheal tube": (
        "Endotracheal tube tip is approximately 4 cm above the carina.",
        "The endotracheal tube terminates above the carina.",
        "Endotracheal tube in satisfactory position above the carina.",
    ),
}
_BONES = (
    "The osseous structures are intact.",
    "No acute bony abnormality.",
    "Visualized XXXX of the chest are within normal limits.",
    "XXXX are intact.",
    "No displaced rib fractures.",
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
    """The findings-section sentence of one finding (each names its side, severity or location)."""
    kind, side, sev, loc = f.kind, f.side or "", f.severity or "", f.location or ""
    if kind == "cardiomegaly":
        return _fmt(_pick(rng, _HEART_ENLARGED), adv=_ADVERB[sev], sev=sev)
    if kind == "mediastinum":
        return _fmt(_pick(rng, _MEDIASTINUM_WIDENED), adv=_ADVERB[sev], sev=sev)
    if kind == "effusion":
        return _fmt(_pick(rng, _EFFUSION_BILATERAL if side == "bilateral" else _EFFUSION), side=side, sev=sev)
    if kind == "pneumothorax":
        return _fmt(_pick(rng, _PNEUMOTHORAX), side=side, sev=sev)
    if kind == "consolidation":
        return _fmt(_pick(rng, _CONSOLIDATION), side=side, lobe=loc)
    if kind == "nodule":
        return _fmt(_pick(rng, _NODULE), side=side, zone=loc, cm=cm)
    if kind == "opacity":
        return _fmt(_pick(rng, _OPACITY), side=side, zone=loc)
    if kind == "pleural":
        return _fmt(_pick(rng, _PLEURAL[loc]), side=side)
    if kind == "atelectasis":
        return _fmt(_pick(rng, _ATELECTASIS), side=side, place=_ATELECTASIS_PLACE[loc].format(side=side))
    if kind == "edema":
        return _fmt(_pick(rng, _EDEMA), sev=sev)
    if kind == "fracture":
        return _fmt(_pick(rng, _FRACTURE), side=side, rib=FRACTURE_RIBS[loc])
    return _fmt(_pick(rng, _DEVICE[loc]), side=side)


def _impression_phrase(f: Finding) -> str:
    """The impression's line for one finding."""
    side, sev, loc = f.side or "", f.severity or "", f.location or ""
    text = {
        "cardiomegaly": f"{sev} cardiomegaly.",
        "mediastinum": f"{sev} widening of the mediastinum.",
        "consolidation": f"{side} {loc} consolidation.",
        "nodule": f"{side} {loc} lung nodule.",
        "opacity": f"{side} {loc} lung opacity.",
        "pleural": f"{side} {loc} pleural thickening.",
        "atelectasis": f"{side} {'midlung' if loc == 'mid' else 'basilar'} atelectasis.",
        "edema": f"{sev} pulmonary edema.",
        "effusion": f"{sev} {side} pleural effusion{'s' if side == 'bilateral' else ''}.",
        "pneumothorax": f"{sev} {side} pneumothorax.",
        "fracture": f"healing {side} {FRACTURE_RIBS.get(loc, '')} rib fracture.",
        "device": {
            "pacemaker": f"{side} pacemaker.",
            "central venous catheter": f"{side} central venous catheter in the superior vena cava.",
            "endotracheal tube": "endotracheal tube above the carina.",
        }.get(loc, ""),
    }[f.kind]
    return text[0].upper() + text[1:]


def write_report(
    findings: list[Finding], rng: np.random.Generator, nodule_cm: str = "1.5"
) -> tuple[str, str]:
    """Writes (findings, impression) text for the drawn findings.

    Sentences go devices, heart, mediastinum, lungs, pleura, bones; absent findings are negated, present
    ones described with their side / severity / location, each read by the CheXpert labeler as exactly its
    kind's observation (`CHEXPERT_OBSERVATION`). The impression lists the positives (or says the study is
    normal, then lists the devices).
    """
    by_kind = {f.kind: f for f in findings}
    sentences: list[str] = []

    def phrase(kind: str) -> str:
        return _finding_phrase(by_kind[kind], rng, nodule_cm)

    # heart and mediastinum
    if "cardiomegaly" in by_kind:
        sentences.append(phrase("cardiomegaly"))
    elif "mediastinum" in by_kind:
        sentences.append(_pick(rng, _HEART_NORMAL))
    else:
        sentences.append(_pick(rng, _HEART_NORMAL + _HEART_AND_MEDIASTINUM_NORMAL))
    if "mediastinum" in by_kind:
        sentences.append(phrase("mediastinum"))
    # lungs
    lung_kinds = [k for k in ("consolidation", "nodule", "opacity", "atelectasis", "edema") if k in by_kind]
    if not lung_kinds:
        sentences.append(_pick(rng, _LUNGS_CLEAR))
    else:
        sentences.extend(phrase(k) for k in lung_kinds)
        if "consolidation" not in by_kind:
            sentences.append(_pick(rng, _NO_CONSOLIDATION))
    # pleura
    ptx, eff = by_kind.get("pneumothorax"), by_kind.get("effusion")
    if ptx is None and eff is None:
        sentences.append(_pick(rng, _NO_PTX_NO_EFF))
    else:
        sentences.extend(phrase(f.kind) for f in (eff, ptx) if f is not None)
        if ptx is None:
            sentences.append(_pick(rng, _NO_PTX))
        if eff is None:
            sentences.append(_pick(rng, _NO_EFF))
    if "pleural" in by_kind:
        sentences.append(phrase("pleural"))
    # bones; devices went first
    bones = phrase("fracture") if "fracture" in by_kind else _pick(rng, _BONES)
    if bones:
        sentences.append(bones)
    if "device" in by_kind:  # lines and tubes first, as many reports (MIMIC-CXR's often) describe them
        sentences.insert(0, phrase("device"))
    findings_text = " ".join(sentences)

    pathology = [f for f in findings if f.kind != "device"]
    devices = [_impression_phrase(f) for f in findings if f.kind == "device"]
    if not pathology:
        impression = " ".join([_pick(rng, _IMPRESSION_NORMAL), *devices])
    else:
        parts = [_impression_phrase(f) for f in pathology]
        order = rng.permutation(len(parts)) if rng.random() < 0.3 else range(len(parts))
        impression = " ".join([*(parts[i] for i in order), *devices])
    return findings_text, impression


def sample_indication(rng: np.random.Generator) -> str:
    """An indication line in the style of the Indiana reports (it says nothing about the findings)."""
    return _pick(rng, _INDICATIONS)
