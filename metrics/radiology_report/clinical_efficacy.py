"""Clinical efficacy (CE): precision / recall / F1 of the CheXpert labels of predictions vs references.

Each report is labelled with the 14 CheXpert observations by `labeler.label_reports`. A label is turned
into a binary "positive" as follows (the field uses both conventions, so it is an option):

- `uncertain="positive"` (default, the CheXpert paper's U-Ones policy): 1 and -1 are positive;
- `uncertain="negative"` (U-Zeros): only 1 is positive;

0 (negative) and None (not mentioned) are never positive. Then, with TP/FP/FN counted per
observation over all examples:

- micro: one precision / recall / F1 from the TP/FP/FN summed over the 14 observations;
- macro: the mean of the per-observation scores over the observations positive in at least one
  reference (`ce_macro_*`: a test set without fractures is not scored on fractures), and over all 14
  with 0 where a score is undefined (`ce_macro_*_14`, sklearn's `zero_division=0`);
- example-based: precision / recall / F1 per report over its set of positive observations, averaged
  over reports; a report whose prediction and reference both have no positive observation scores 1.

Where a ratio has a zero denominator it is 0 (e.g. the precision of an observation never predicted).
Beside each per-observation score, `ce_support_<observation>` is the number of examples whose
reference is positive for it, so a macro average over observations with 2 positives shows as such.

Several references per example: each reference is labelled, and the labels are merged per observation
with the CheXpert labeler's own aggregation rule (positive > uncertain > negative > not mentioned;
`merge_reference_labels`). An observation is thus positive for the example when any reference states
it. "No Finding" is recomputed from the merged labels: 1 when none of the 12 pathologies is positive or
uncertain and some reference says 1, else blank (never 0, as CheXpert writes it).
"""

from __future__ import annotations

import re

from .labeler import CHEXPERT_OBSERVATIONS, NEGATIVE, PATHOLOGY_OBSERVATIONS, POSITIVE, UNCERTAIN

UNCERTAIN_POLICIES = ("positive", "negative")


def observation_key(observation: str) -> str:
    """ "Pleural Effusion" -> "pleural_effusion" (used in per-observation metric keys)."""
    return re.sub(r"[^a-z0-9]+", "_", observation.lower()).strip("_")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def merge_reference_labels(labels: list[dict[str, int | None]]) -> dict[str, int | None]:
    """Merges the labels of several references of one example into one set of labels.

    Args:
        labels (`list[dict[str, int | None]]`): the `label_report` output of each reference (at least one).

    Returns:
        `dict[str, int | None]`: per observation the strongest label over the references (positive >
        uncertain > negative > None, the CheXpert aggregation rule); "No Finding" is 1 when no merged
        pathology is positive or uncertain and some reference has "No Finding" 1, else None (never 0, as
        CheXpert writes it).
    """
    if not labels:
        raise ValueError("merge_reference_labels needs the labels of at least one reference, got none.")
    if len(labels) == 1:
        return dict(labels[0])
    order = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1, None: 0}
    merged = {o: max((lab.get(o) for lab in labels), key=order.__getitem__) for o in CHEXPERT_OBSERVATIONS}
    finding = any(merged[o] in (POSITIVE, UNCERTAIN) for o in PATHOLOGY_OBSERVATIONS)
    merged["No Finding"] = POSITIVE if merged["No Finding"] == POSITIVE and not finding else None
    return merged


def binarize(labels: dict[str, int | None], uncertain: str = "positive") -> list[bool]:
    """The positive/negative vector of one report's labels, in `CHEXPERT_OBSERVATIONS` order.

    Args:
        labels (`dict[str, int | None]`): output of `label_report`.
        uncertain (`str`, *optional*, defaults to `"positive"`): how -1 is read, `"positive"` or `"negative"`.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"ce_uncertain={uncertain!r} is not supported: use one of {UNCERTAIN_POLICIES}.")
    positive = (1, -1) if uncertain == "positive" else (1,)
    return [labels.get(o) in positive for o in CHEXPERT_OBSERVATIONS]


def clinical_efficacy_scores(
    prediction_labels: list[dict[str, int | None]],
    reference_labels: list[dict[str, int | None]],
    uncertain: str = "positive",
) -> dict[str, float]:
    """CE scores from labelled predictions and references.

    Args:
        prediction_labels (`list[dict[str, int | None]]`): labels of the predictions.
        reference_labels (`list[dict[str, int | None]]`): labels of the references (same length).
        uncertain (`str`, *optional*, defaults to `"positive"`): `"positive"` (U-Ones) or `"negative"` (U-Zeros).

    Returns:
        `dict[str, float]`: `ce_micro_{precision,recall,f1}`, `ce_macro_{precision,recall,f1}`,
        `ce_macro_{precision,recall,f1}_14`, `ce_example_{precision,recall,f1}`, `ce_num_observations`
        (observations positive in at least one reference) and per observation
        `ce_{precision,recall,f1}_<observation>` (e.g. `ce_f1_pleural_effusion`) with
        `ce_support_<observation>` (how many references are positive).
    """
    if len(prediction_labels) != len(reference_labels):
        raise ValueError(
            f"Got {len(prediction_labels)} prediction labels but {len(reference_labels)} reference labels."
        )
    if not prediction_labels:
        raise ValueError("No reports to score: pass at least one prediction/reference pair.")
    predicted = [binarize(lab, uncertain) for lab in prediction_labels]
    actual = [binarize(lab, uncertain) for lab in reference_labels]

    scores: dict[str, float] = {}
    per_observation = []
    total_tp = total_fp = total_fn = 0
    for j, observation in enumerate(CHEXPERT_OBSERVATIONS):
        tp = sum(p[j] and a[j] for p, a in zip(predicted, actual))
        fp = sum(p[j] and not a[j] for p, a in zip(predicted, actual))
        fn = sum(a[j] and not p[j] for p, a in zip(predicted, actual))
        total_tp, total_fp, total_fn = total_tp + tp, total_fp + fp, total_fn + fn
        precision, recall, f1 = _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)
        per_observation.append((observation, tp + fn > 0, precision, recall, f1))
        key = observation_key(observation)
        scores[f"ce_precision_{key}"] = precision
        scores[f"ce_recall_{key}"] = recall
        scores[f"ce_f1_{key}"] = f1
        scores[f"ce_support_{key}"] = float(tp + fn)

    scores["ce_micro_precision"] = _ratio(total_tp, total_tp + total_fp)
    scores["ce_micro_recall"] = _ratio(total_tp, total_tp + total_fn)
    scores["ce_micro_f1"] = _ratio(2 * total_tp, 2 * total_tp + total_fp + total_fn)

    present = [row for row in per_observation if row[1]]
    for index, name in ((2, "precision"), (3, "recall"), (4, "f1")):
        scores[f"ce_macro_{name}"] = _ratio(sum(row[index] for row in present), len(present))
        scores[f"ce_macro_{name}_14"] = sum(row[index] for row in per_observation) / len(per_observation)
    scores["ce_num_observations"] = float(len(present))

    example_p, example_r, example_f = [], [], []
    for p, a in zip(predicted, actual):
        n_pred, n_true = sum(p), sum(a)
        both = sum(x and y for x, y in zip(p, a))
        if n_pred == 0 and n_true == 0:
            example_p.append(1.0), example_r.append(1.0), example_f.append(1.0)
            continue
        example_p.append(_ratio(both, n_pred))
        example_r.append(_ratio(both, n_true))
        example_f.append(_ratio(2 * both, n_pred + n_true))
    n = len(predicted)
    scores["ce_example_precision"] = sum(example_p) / n
    scores["ce_example_recall"] = sum(example_r) / n
    scores["ce_example_f1"] = sum(example_f) / n
    return scores
