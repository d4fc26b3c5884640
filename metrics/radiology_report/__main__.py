"""Score any system's generated reports: `python -m metrics.radiology_report PREDICTIONS [--references REFS]`.

Reads predictions and references from JSONL or CSV (`report_files.read_report_pairs`), computes the
`radiology_report` metrics with `compute_radiology_report_scores` (the numbers our own evaluation
reports), prints a metric table and writes every value as JSON to `--output`. Example, for another
system's generated reports (a CSV with `id` and `prediction` columns) against a references file:

    python -m metrics.radiology_report --predictions r2gen_test.csv --references test_references.jsonl \
        --output r2gen_scores.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .clinical_efficacy import UNCERTAIN_POLICIES, observation_key
from .labeler import CHEXPERT_OBSERVATIONS
from .language_metrics import NORMALIZATIONS
from .radiology_report import compute_radiology_report_scores
from .report_files import ReportFileError, read_report_pairs

logger = logging.getLogger(__name__)

LANGUAGE_ROWS = (
    ("BLEU-1", "bleu_1"),
    ("BLEU-2", "bleu_2"),
    ("BLEU-3", "bleu_3"),
    ("BLEU-4", "bleu_4"),
    ("METEOR", "meteor"),
    ("ROUGE-L", "rouge_l"),
    ("CIDEr", "cider"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m metrics.radiology_report",
        description=(
            "Score generated chest X-ray reports against references with the radiology_report metric "
            "(BLEU-1..4, METEOR, ROUGE-L, CIDEr, BERTScore, CheXpert clinical efficacy), from JSONL or CSV."
        ),
    )
    parser.add_argument(
        "predictions_file",
        nargs="?",
        metavar="PREDICTIONS",
        help="JSONL or CSV with a prediction column (and a reference column unless --references is given), "
        "e.g. the predictions.jsonl of run_captioning.py.",
    )
    parser.add_argument("--predictions", help="the same as PREDICTIONS, as an option.")
    parser.add_argument(
        "--references",
        help="JSONL or CSV of references, joined to the predictions by --id_column when both files have "
        "it, else by row order (the counts must match).",
    )
    parser.add_argument(
        "--prediction_column", default="prediction", help="column/key of the generated report."
    )
    parser.add_argument(
        "--reference_column",
        default="reference",
        help="column/key of the reference: a string, or a list of strings (in CSV: a JSON list) for several.",
    )
    parser.add_argument(
        "--id_column", default="id", help="column/key of the study id used to join two files."
    )
    parser.add_argument("--output", type=Path, help="write every metric value to this JSON file.")
    parser.add_argument("--no_bertscore", action="store_true", help="skip BERTScore (its values are null).")
    parser.add_argument("--no_meteor", action="store_true", help="skip METEOR (null; it needs Java).")
    parser.add_argument(
        "--normalization",
        default="r2gen",
        choices=NORMALIZATIONS,
        help="text normalisation before the n-gram metrics and BERTScore (default: R2Gen's IU X-ray cleaning).",
    )
    parser.add_argument(
        "--ce_uncertain",
        default="positive",
        choices=UNCERTAIN_POLICIES,
        help="uncertain CheXpert labels count as positive (U-Ones, default) or negative (U-Zeros).",
    )
    parser.add_argument(
        "--bertscore_model_type",
        help="BERTScore model: a Hub id (e.g. roberta-large, needs the network) or a local folder "
        "(default: the packaged MiniLM-L6).",
    )
    parser.add_argument(
        "--bertscore_num_layers", type=int, help="BERTScore layer (default: the model's own)."
    )
    args = parser.parse_args(argv)
    if args.predictions_file and args.predictions and args.predictions_file != args.predictions:
        parser.error(f"two predictions files given ({args.predictions_file}, {args.predictions}): pass one.")
    args.predictions = args.predictions or args.predictions_file
    if not args.predictions:
        parser.error("no predictions file: pass PREDICTIONS (or --predictions).")
    return args


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_scores(results: dict) -> str:
    """A readable table of the headline metrics and the per-observation clinical efficacy.

    Args:
        results (`dict`): the output of `compute_radiology_report_scores`.

    Returns:
        `str`: three Markdown tables (language metrics; precision / recall / F1 of BERTScore and CE;
        CE per CheXpert observation). Skipped or unavailable values read "n/a".
    """
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {_value(results[key])} |" for name, key in LANGUAGE_ROWS]

    bertscore = "BERTScore"
    if results.get("bertscore_model"):
        bertscore += f" ({results['bertscore_model']}, layer {results['bertscore_num_layers']})"
    num_observations = int(results["ce_num_observations"])
    prf_rows = (
        (bertscore, "bertscore_{}"),
        ("CE micro", "ce_micro_{}"),
        (f"CE macro ({num_observations} observations with a positive reference)", "ce_macro_{}"),
        ("CE macro (all 14 observations)", "ce_macro_{}_14"),
        ("CE example-based", "ce_example_{}"),
    )
    lines += ["", "| score | precision | recall | F1 |", "|---|---:|---:|---:|"]
    for name, pattern in prf_rows:
        values = " | ".join(_value(results[pattern.format(p)]) for p in ("precision", "recall", "f1"))
        lines.append(f"| {name} | {values} |")

    lines += ["", "| CheXpert observation | support | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
    for observation in CHEXPERT_OBSERVATIONS:
        key = observation_key(observation)
        values = " | ".join(_value(results[f"ce_{p}_{key}"]) for p in ("precision", "recall", "f1"))
        lines.append(f"| {observation} | {int(results[f'ce_support_{key}'])} | {values} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Reads the files, scores them, prints the table and writes `--output`; returns the metric dict."""
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        predictions, references = read_report_pairs(
            args.predictions,
            args.references,
            prediction_column=args.prediction_column,
            reference_column=args.reference_column,
            id_column=args.id_column,
        )
    except ReportFileError as error:
        sys.exit(f"error: {error}")
    results = compute_radiology_report_scores(
        predictions,
        references,
        normalization=args.normalization,
        bertscore=not args.no_bertscore,
        bertscore_model_type=args.bertscore_model_type,
        bertscore_num_layers=args.bertscore_num_layers,
        meteor=not args.no_meteor,
        ce_uncertain=args.ce_uncertain,
    )
    source = args.predictions + (f" against {args.references}" if args.references else "")
    print(
        f"{results['num_examples']} predictions ({results['num_empty_predictions']} empty) of {source}, "
        f"normalization={args.normalization}, ce_uncertain={args.ce_uncertain}:\n"
    )
    print(format_scores(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nAll {len(results)} values written to {args.output}")
    return results


if __name__ == "__main__":
    main()
