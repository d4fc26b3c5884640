"""The report text of a phantom study: a function of the drawn findings, plus the choice of paraphrase.

Sentences go heart, lungs, pleura, bones, in the style of the Indiana reports (including their `XXXX`
anonymisation tokens); absent findings are negated, present ones described with side, severity and location.
"""

from __future__ import annotations

import numpy as np

from .phantom_findings import Finding

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


def sample_indication(rng: np.random.Generator) -> str:
    """An indication line in the style of the Indiana reports (it says nothing about the findings)."""
    return _pick(rng, _INDICATIONS)
