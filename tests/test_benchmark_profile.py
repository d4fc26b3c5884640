"""The profile section (benchmarks/step_profile.py) and the doc blocks generated from results files
(benchmarks/report.py): the breakdown shares out the step's whole self CPU time, and the doc follows the file."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from testing_utils import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import report, run  # noqa: E402
from benchmarks.step_profile import OTHER_OPS, OUTSIDE_ATEN, group_breakdown  # noqa: E402


def test_group_breakdown_sums_ops_into_their_groups_largest_first():
    op_seconds = {
        "aten::mm": 3.0,
        "aten::addmm": 1.0,
        "aten::copy_": 2.0,
        "aten::empty_strided": 0.5,
        "Optimizer.step#AdamW.step": 1.5,
        "aten::bernoulli_": 0.0,
    }
    groups = group_breakdown(op_seconds, steps=2)
    by_name = {group["group"]: group for group in groups}
    assert [g["group"] for g in groups] == [
        "matrix products",
        "autocast's dtype casts",
        OUTSIDE_ATEN,
        OTHER_OPS,
        "dropout masks",
    ]
    assert by_name["matrix products"]["ops"] == ["mm", "addmm"]
    assert by_name["matrix products"]["seconds_per_step"] == pytest.approx(2.0)
    assert by_name["matrix products"]["fraction"] == pytest.approx(0.5)
    assert by_name["dropout masks"]["ops"] == []  # an op that took no time is not named
    assert sum(g["fraction"] for g in groups) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no CPU time"):
        group_breakdown({}, steps=1)


def test_profile_section_writes_its_file_and_the_paragraph_renders(tmp_path):
    """`--sections profile` at toy size: a results file with the machine, the commit and a breakdown of the real
    step's ops (matrix products among them) whose paragraph names each large group with its share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        output = tmp_path / "profile.json"
        assert run.main(["--smoke", "--sections", "profile", "--output", str(output)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(output.read_text())
    section = results["sections"]["profile"]
    assert results["machine"]["git_commit"] and section["steps"] == 1
    assert section["self_cpu_seconds_per_step"] > 0
    assert "matrix products" in {group["group"] for group in section["groups"]}
    paragraph = report.render_profile(results)
    assert "`torch.profiler` over 1 steps after 1 warm-up steps of tiny" in paragraph
    named = [g for g in section["groups"] if g["fraction"] >= report.SMALLEST_GROUP_NAMED]
    for group in named:
        assert f"{group['group']}" in paragraph and f"{group['fraction']:.0%}" in paragraph


def test_write_doc_replaces_only_its_block(tmp_path):
    results = json.loads((report.RESULTS / report.FIGURES).read_text())
    begin, end = report.MARKERS[report.FIGURES]
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(f"before\n{begin}\nold\n{end}\nafter\n")
    report.write_doc(results, report.FIGURES, doc)
    assert doc.read_text() == f"before\n{begin}\n{report.render_figures(results)}\n{end}\nafter\n"
    assert report.doc_block(report.FIGURES, doc) == report.render_figures(results)
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.write_doc(results, report.FIGURES, doc)
