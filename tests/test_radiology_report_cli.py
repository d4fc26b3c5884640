"""`python -m metrics.radiology_report`: scoring any system's reports from JSONL or CSV files."""

import csv
import json
import subprocess
import sys

import pytest
from xraycap.radiology_report.__main__ import main
from xraycap.radiology_report.radiology_report import compute_radiology_report_scores

FAST = ["--no_bertscore", "--no_meteor"]

# (id, prediction, reference): an exact match, a partial one, several references, an empty prediction.
ROWS = [
    ("s1", "The heart is normal in size. The lungs are clear.", "Heart size is normal. The lungs are clear."),
    ("s2", "Mild cardiomegaly. No pleural effusion.", "Mild cardiomegaly with small left pleural effusion."),
    (
        "s3",
        "There is a small right pneumothorax.",
        ["Small right pneumothorax.", "Right apical pneumothorax, no effusion."],
    ),
    ("s4", "", "Bibasilar atelectasis. No pneumothorax."),
    ("s5", "No acute cardiopulmonary abnormality.", "No acute cardiopulmonary abnormality."),
]
PREDICTIONS = [p for _, p, _ in ROWS]
REFERENCES = [r for _, _, r in ROWS]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def our_predictions_jsonl(path):
    """The layout of run_captioning.py's predictions.jsonl."""
    rows = [
        {"id": i, "reference": r, "prediction": p, "prediction_image_ablated": "The lungs are clear."}
        for i, p, r in ROWS
    ]
    return write_jsonl(path, rows)


def test_jsonl_output_equals_compute_radiology_report_scores(tmp_path, capsys):
    """Our predictions.jsonl is scored exactly as the metric scores the same lists, the empty prediction included."""
    output = tmp_path / "scores" / "scores.json"
    returned = main(
        [str(our_predictions_jsonl(tmp_path / "predictions.jsonl")), *FAST, "--output", str(output)]
    )
    expected = compute_radiology_report_scores(PREDICTIONS, REFERENCES, bertscore=False, meteor=False)
    assert json.loads(output.read_text()) == expected
    assert returned == expected
    assert expected["num_examples"] == 5 and expected["num_empty_predictions"] == 1
    printed = capsys.readouterr().out
    assert "5 predictions (1 empty)" in printed
    assert f"| BLEU-4 | {expected['bleu_4']:.4f} |" in printed
    assert f"| Cardiomegaly | 1 | {expected['ce_precision_cardiomegaly']:.4f} |" in printed
    assert "| METEOR | n/a |" in printed


def test_options_reach_the_metric(tmp_path):
    """--normalization, --ce_uncertain and --prediction_column change the scores as the metric's options do."""
    path = our_predictions_jsonl(tmp_path / "predictions.jsonl")
    options = ["--normalization", "none", "--ce_uncertain", "negative", "--prediction_column"]
    scores = main([str(path), *FAST, *options, "prediction_image_ablated"])
    expected = compute_radiology_report_scores(
        ["The lungs are clear."] * 5,
        REFERENCES,
        normalization="none",
        ce_uncertain="negative",
        bertscore=False,
        meteor=False,
    )
    assert scores == expected


def test_csv_with_a_json_list_of_references(tmp_path):
    """A CSV file scores like the JSONL; a cell holding a JSON list is several references."""
    rows = [
        {"id": i, "prediction": p, "reference": r if isinstance(r, str) else json.dumps(r)}
        for i, p, r in ROWS
    ]
    scores = main([str(write_csv(tmp_path / "out.csv", rows)), *FAST])
    assert scores == compute_radiology_report_scores(PREDICTIONS, REFERENCES, bertscore=False, meteor=False)


def test_separate_files_are_joined_by_id(tmp_path):
    """Predictions (CSV, shuffled) and references (JSONL, integer ids) are paired by id, not by row order."""
    order = [3, 0, 4, 2, 1]
    predictions = write_csv(tmp_path / "system.csv", [{"id": k, "prediction": ROWS[k][1]} for k in order])
    references = write_jsonl(
        tmp_path / "refs.jsonl", [{"id": k, "reference": r} for k, (_, _, r) in enumerate(ROWS)]
    )
    scores = main(["--predictions", str(predictions), "--references", str(references), *FAST])
    expected = compute_radiology_report_scores(
        [PREDICTIONS[k] for k in order], [REFERENCES[k] for k in order], bertscore=False, meteor=False
    )
    assert scores == expected
    # The pairing matters: the same files paired by row order score differently.
    by_row = compute_radiology_report_scores(
        [PREDICTIONS[k] for k in order], REFERENCES, bertscore=False, meteor=False
    )
    assert scores["ce_micro_f1"] != by_row["ce_micro_f1"]


def test_separate_files_without_ids_are_paired_by_row_order(tmp_path):
    """Without ids, row i of the predictions goes with row i of the references; the counts must match."""
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"prediction": p} for p in PREDICTIONS])
    references = write_csv(
        tmp_path / "r.csv", [{"reference": r if isinstance(r, str) else r[0]} for r in REFERENCES]
    )
    scores = main([str(predictions), "--references", str(references), *FAST])
    expected_refs = [r if isinstance(r, str) else r[0] for r in REFERENCES]
    assert scores == compute_radiology_report_scores(
        PREDICTIONS, expected_refs, bertscore=False, meteor=False
    )

    short = write_jsonl(tmp_path / "short.jsonl", [{"prediction": p} for p in PREDICTIONS[:3]])
    with pytest.raises(SystemExit, match=r"short\.jsonl has 3 predictions but .*r\.csv has 5 references"):
        main([str(short), "--references", str(references), *FAST])


def test_null_prediction_is_scored_as_empty(tmp_path):
    """A null prediction (a system that generated nothing) is scored as an empty report, not dropped."""
    rows = [{"reference": r, "prediction": None if p == "" else p} for _, p, r in ROWS]
    scores = main([str(write_jsonl(tmp_path / "p.jsonl", rows)), *FAST])
    assert scores["num_examples"] == 5 and scores["num_empty_predictions"] == 1


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"p.jsonl": [{"id": "a", "generated": "x", "reference": "y"}]},
            r"p\.jsonl, line 1: no 'prediction' column/key \(it has 'id', 'generated', 'reference'\).*--prediction_column",
        ),
        (
            {"p.csv": [{"id": "a", "prediction": "x", "ground_truth": "y"}]},
            r"p\.csv, line 2: no 'reference' column/key .*--reference_column",
        ),
        (
            {
                "p.jsonl": [{"id": "a", "prediction": "x"}, {"id": "b", "prediction": "y"}],
                "r.jsonl": [{"id": "a", "reference": "y"}],
            },
            r"r\.jsonl: no reference for 1 id\(s\) of .*p\.jsonl: 'b'",
        ),
        (
            {
                "p.jsonl": [{"id": "a", "prediction": "x"}],
                "r.jsonl": [{"id": "a", "reference": "y"}, {"id": "a", "reference": "z"}],
            },
            r"r\.jsonl: id 'a' appears more than once",
        ),
        ({"p.txt": [{"prediction": "x", "reference": "y"}]}, r"p\.txt: unknown file type '\.txt'"),
    ],
)
def test_bad_inputs_stop_with_an_error_naming_the_file(tmp_path, files, message):
    """A missing column, an unmatched or duplicate id, or an unknown format names the file and the fix."""
    paths = []
    for name, rows in files.items():
        path = tmp_path / name
        write_csv(path, rows) if name.endswith(".csv") else write_jsonl(path, rows)
        paths.append(str(path))
    argv = [paths[0], *(["--references", paths[1]] if len(paths) > 1 else []), *FAST]
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_references_without_a_prediction_are_an_error(tmp_path):
    """A study in the references that the system did not score stops the run instead of being skipped."""
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "x"}])
    references = write_jsonl(
        tmp_path / "r.jsonl", [{"id": "a", "reference": "y"}, {"id": "b", "reference": "z"}]
    )
    with pytest.raises(SystemExit, match=r"p\.jsonl: no prediction for 1 id\(s\) of .*r\.jsonl: 'b'"):
        main([str(predictions), "--references", str(references), *FAST])


def test_python_dash_m_runs_and_fails_cleanly(tmp_path, repo_root):
    """`python -m metrics.radiology_report` writes the JSON; a bad column exits 1 with a one-line error, no traceback."""
    path = our_predictions_jsonl(tmp_path / "predictions.jsonl")
    output = tmp_path / "scores.json"
    command = [sys.executable, "-m", "metrics.radiology_report", str(path), *FAST]
    done = subprocess.run(
        [*command, "--output", str(output)], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(output.read_text())["num_examples"] == 5
    failed = subprocess.run(
        [*command, "--reference_column", "findings"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert "no 'findings' column/key" in failed.stderr and "Traceback" not in failed.stderr
