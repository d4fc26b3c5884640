"""Repeated runs: several seeds, K-fold cross-validation by study, and their mean ± std.

`--num_seeds N` trains N runs (seeds `seed`, `seed + 1`, ...) on the same data and split; `--folds K` trains one
run per fold, each validating on a different K-th of the train + validation studies (the test split is never
touched). `run_plan` names the runs, `cross_validation_fold` makes a fold's splits, `summarize` turns the runs'
`eval_results.json` into `eval_summary.json`, and `summary_table` is its Markdown table for the model cards.
"""

from __future__ import annotations

import math
import random
from typing import Any

import datasets

# The evaluations summarized, in the order the tables show them.
SUMMARY_SPLITS = ("test", "test_image_ablated", "test_nearest_train", "validation")


def run_plan(seed: int, num_seeds: int, folds: int, fold: int | None = None) -> list[dict[str, Any]]:
    """The runs of a repeated experiment: every seed crossed with every fold.

    Args:
        seed (`int`): the first seed; the others follow it (`seed + 1`, ...).
        num_seeds (`int`): how many seeds (1: only `seed`).
        folds (`int`): how many cross-validation folds (1: the build's own train / validation split).
        fold (`int`, *optional*): only this fold of the `folds`.

    Returns:
        `list[dict]`: one `{"name", "seed", "fold"}` per run; `name` is its sub-folder (`seed-42`, `fold-0`,
        `seed-42-fold-0`); `fold` is None without cross-validation.
    """
    if num_seeds < 1 or folds < 1:
        raise ValueError(f"--num_seeds {num_seeds} and --folds {folds} must both be >= 1.")
    fold_list = [None] if folds == 1 else list(range(folds)) if fold is None else [fold]
    runs = []
    for s in range(seed, seed + num_seeds):
        for f in fold_list:
            parts = ([f"seed-{s}"] if num_seeds > 1 else []) + ([f"fold-{f}"] if f is not None else [])
            runs.append({"name": "-".join(parts), "seed": s, "fold": f})
    return runs


def cross_validation_fold(
    train: datasets.Dataset, validation: datasets.Dataset, folds: int, fold: int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Fold `fold` of a K-fold cross-validation over the train + validation studies.

    The pooled studies are shuffled once with `seed` (the same for every fold, so the folds partition them)
    and dealt into `folds` parts; part `fold` validates, the others train. Every row is one study, so no study
    is in two parts. The test split is not an argument: it stays as built.

    Args:
        train (`datasets.Dataset`), validation (`datasets.Dataset`): the build's splits.
        folds (`int`): K, at least 2.
        fold (`int`): which part validates, `0 <= fold < folds`.
        seed (`int`): the shuffle seed (the split seed, not the training seed).

    Returns:
        `tuple(datasets.Dataset, datasets.Dataset)`: this fold's train and validation studies.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"--fold {fold} of --folds {folds}: use folds >= 2 and 0 <= fold < folds.")
    pooled = datasets.concatenate_datasets([train, validation])
    if len(pooled) < folds:
        raise ValueError(f"--folds {folds} is more than the {len(pooled)} train + validation studies.")
    order = random.Random(seed).sample(range(len(pooled)), len(pooled))  # indices only: no image is copied
    held_out = sorted(order[fold::folds])
    kept = set(held_out)
    return pooled.select([i for i in order if i not in kept]), pooled.select(held_out)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std of every metric over the runs.

    Args:
        runs (`list[dict]`): one `{"name", "seed", "fold", "results"}` per run, `results` being its
            `eval_results.json`.

    Returns:
        `dict`: `eval_summary.json`'s content: `{"num_runs", "runs": [...], "summary": {split: {metric: {"mean",
        "std", "n", "values"}}}}`. `std` is the sample standard deviation (n - 1; 0.0 for one run); a metric
        that is None in some run (no positive reference, say) is summarized over the runs that have it.
    """
    summary: dict[str, dict[str, Any]] = {}
    for split in SUMMARY_SPLITS:
        keys = dict.fromkeys(k for run in runs for k in run["results"].get(split, {}))
        for key in keys:
            values = [run["results"].get(split, {}).get(key) for run in runs]
            values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if not values:
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            summary.setdefault(split, {})[key] = {
                "mean": mean,
                "std": math.sqrt(var),
                "n": len(values),
                "values": values,
            }
    listed = [{k: run[k] for k in ("name", "seed", "fold", "output_dir") if k in run} for run in runs]
    return {"num_runs": len(runs), "runs": listed, "summary": summary}


def summary_table(summary: dict[str, Any], metrics: list[str]) -> str:
    """The Markdown table of `eval_summary.json`: one row per metric, one `mean ± std` column per evaluation.

    Args:
        summary (`dict`): [`summarize`]'s output.
        metrics (`list[str]`): the metrics shown, in order (those no run has are left out).
    """
    stats = summary["summary"]
    splits = [s for s in SUMMARY_SPLITS if s in stats]
    lines = [
        f"Mean ± sample std over {summary['num_runs']} runs ({', '.join(r['name'] for r in summary['runs'])}).",
        "",
        "| metric | " + " | ".join(splits) + " |",
        "|---" * (len(splits) + 1) + "|",
    ]
    for key in metrics:
        if any(key in stats[s] for s in splits):
            cells = [
                f"{stats[s][key]['mean']:.3f} ± {stats[s][key]['std']:.3f}" if key in stats[s] else "n/a"
                for s in splits
            ]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
