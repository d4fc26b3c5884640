"""Seeds and folds (`--num_seeds`, `--folds`), their summary, and the nearest-train retrieval floor."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from testing_utils import SMALL_RUN, reset_accelerate_state

from xraycap.training.evaluation import nearest_train_rows
from xraycap.training.feature_cache import pool_views
from xraycap.training.repeats import cross_validation_fold, run_plan, summarize, summary_table

FAST = ["--max_steps", "2", "--num_beams", "1", "--max_new_tokens", "8", "--per_device_eval_batch_size", "16"]


def studies(n: int, start: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"uid": [str(i) for i in range(start, start + n)], "report": ["r"] * n})


def test_folds_partition_train_and_validation_and_leave_test_alone():
    """Every train + validation study validates in exactly one fold and trains in the others; the same seed
    gives the same folds; the test split is not an input, so it cannot move."""
    train, validation = studies(23), studies(7, start=23)
    held_out = []
    for fold in range(5):
        fold_train, fold_val = cross_validation_fold(train, validation, 5, fold, seed=42)
        assert not set(fold_train["uid"]) & set(fold_val["uid"])
        assert set(fold_train["uid"]) | set(fold_val["uid"]) == {str(i) for i in range(30)}
        assert len(fold_val) == 6
        held_out += fold_val["uid"]
        again = cross_validation_fold(train, validation, 5, fold, seed=42)[1]
        assert again["uid"] == fold_val["uid"]
    assert sorted(held_out, key=int) == [str(i) for i in range(30)]
    with pytest.raises(ValueError, match="--fold 5 of --folds 5"):
        cross_validation_fold(train, validation, 5, 5, seed=42)


def test_run_plan_crosses_seeds_and_folds():
    assert [r["name"] for r in run_plan(7, 2, 1)] == ["seed-7", "seed-8"]
    assert [r["name"] for r in run_plan(7, 1, 3)] == ["fold-0", "fold-1", "fold-2"]
    plan = run_plan(7, 2, 2)
    assert [(r["seed"], r["fold"]) for r in plan] == [(7, 0), (7, 1), (8, 0), (8, 1)]
    assert [r["name"] for r in run_plan(7, 2, 4, fold=3)] == ["seed-7-fold-3", "seed-8-fold-3"]


def test_summary_is_mean_and_sample_std_of_each_metric():
    runs = [
        {
            "name": f"seed-{i}",
            "seed": i,
            "fold": None,
            "results": {"test": {"ce_macro_f1": v, "bleu_4": None}},
        }
        for i, v in enumerate((0.5, 0.7, 0.9))
    ]
    summary = summarize(runs)
    stats = summary["summary"]["test"]["ce_macro_f1"]
    assert stats["mean"] == pytest.approx(0.7) and stats["std"] == pytest.approx(0.2) and stats["n"] == 3
    assert "bleu_4" not in summary["summary"]["test"]  # None in every run: nothing to summarize
    table = summary_table(summary, ["ce_macro_f1", "bleu_4"])
    assert "| ce_macro_f1 | 0.700 ± 0.200 |" in table and "bleu_4" not in table


def test_nearest_train_returns_the_report_of_the_most_similar_study():
    """Cosine of the pooled features: direction counts, not length; absent views do not count."""
    train = datasets.Dataset.from_dict({"pooled": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]})
    test = datasets.Dataset.from_dict({"pooled": [[10.0, 0.5], [0.1, 3.0], [2.0, 2.1]]})
    reset_accelerate_state()
    assert nearest_train_rows(train, test, Accelerator(cpu=True)) == {0: 0, 1: 1, 2: 2}
    reset_accelerate_state()
    features = torch.tensor(
        [[[[1.0, 0.0], [3.0, 0.0]], [[0.0, 50.0], [0.0, 50.0]]]]
    )  # (1 study, 2 views, 2 tokens)
    assert pool_views(features, torch.tensor([[True, False]])).tolist() == [[2.0, 0.0]]


@pytest.fixture
def fresh_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def test_num_seeds_and_folds_train_every_run_and_summarize_them(tmp_path: Path, fresh_state):
    """`--num_seeds 2 --folds 2`: four model folders on one test split, one eval_summary.json whose means are
    the runs' own scores, the summary table in every run's card, and the nearest-train floor in each run."""
    from huggingface_hub import ModelCard

    import run_captioning

    out = tmp_path / "out"
    args = [*SMALL_RUN, *FAST, "--num_seeds", "2", "--folds", "2", "--output_dir", str(out)]
    run_captioning.main([*args, "--cache_dir", str(tmp_path / "cache")])
    summary = json.loads((out / "eval_summary.json").read_text())
    names = ["seed-3-fold-0", "seed-3-fold-1", "seed-4-fold-0", "seed-4-fold-1"]
    assert [r["name"] for r in summary["runs"]] == names
    results = [json.loads((out / name / "eval_results.json").read_text()) for name in names]
    for split in ("test", "test_image_ablated", "test_nearest_train"):
        stats = summary["summary"][split]["ce_micro_f1"]
        values = [r[split]["ce_micro_f1"] for r in results]
        assert stats["values"] == values and stats["mean"] == pytest.approx(sum(values) / 4), split
    # One split seed: every run is tested on the same studies; each fold validates on different ones.
    test_ids = [{json.loads(line)["id"] for line in open(out / name / "predictions.jsonl")} for name in names]
    assert all(ids == test_ids[0] for ids in test_ids)
    sizes = [r["run"]["num_examples"] for r in results]
    assert sizes[0]["train"] + sizes[0]["validation"] == 32 and sizes[0]["test"] == 8
    card = ModelCard.load(out / names[0] / "README.md")
    assert "## Across runs" in card.text and "| test | test_image_ablated | test_nearest_train |" in card.text
    row = json.loads(open(out / names[0] / "predictions.jsonl").readline())
    assert set(row) >= {"prediction", "prediction_image_ablated", "prediction_nearest_train"}


def test_repeats_refuse_a_single_checkpoint_and_the_hub(tmp_path: Path):
    import run_captioning

    with pytest.raises(ValueError, match="--push_to_hub with --num_seeds"):
        run_captioning.parse_args(["--num_seeds", "3", "--push_to_hub", "true", "--hub_model_id", "a/b"])
    with pytest.raises(ValueError, match="use 'latest'"):
        run_captioning.parse_args(["--folds", "3", "--resume_from_checkpoint", str(tmp_path)])
    with pytest.raises(ValueError, match="--fold 3 needs --folds K"):
        run_captioning.parse_args(["--folds", "3", "--fold", "3"])
