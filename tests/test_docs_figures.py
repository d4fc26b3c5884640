"""Every figure the docs quote is the one in a committed results file: docs/PERFORMANCE.md's generated blocks,
the README's performance ratios and labeler agreement, docs/TRAINING.md's floor figures and the metric README's
agreement tables and what-if scores. A hand-edited number, or a results file re-measured without its docs, fails."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import report  # noqa: E402

README = (REPO_ROOT / "README.md").read_text()
METRIC_README = (REPO_ROOT / "metrics" / "radiology_report" / "README.md").read_text()
METRIC_RESULTS = REPO_ROOT / "metrics" / "radiology_report" / "results"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _flat(text: str) -> str:
    """The text with line breaks and runs of spaces as single spaces (prose is wrapped anywhere)."""
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("name", [report.FIGURES, report.PROFILE])
def test_performance_doc_blocks_are_the_results_files(name):
    """docs/PERFORMANCE.md's current figures and profile paragraph are what `benchmarks/report.py` renders from
    the committed results files, which name their commit and machine."""
    results = _json(report.RESULTS / name)
    assert report.doc_block(name) == report.RENDER[name](results)
    machine = results["machine"]
    assert machine["git_commit"] and machine["cpu"] and machine["cpu_count"]


def test_build_memory_figure_names_its_image_size():
    """The dataset build memory figure says the size of the images it built, from latest.json's settings, in
    the table and in the figure's description."""
    results = _json(report.RESULTS / report.FIGURES)
    px = results["settings"]["build_image_px"]
    series = results["sections"]["build"]["series"]
    row = next(line for line in report.doc_block(report.FIGURES).splitlines() if "Dataset build" in line)
    assert f"images of {px} x {px} px" in row
    assert " / ".join(f"{r['peak_rss_mb']:.0f}" for r in series) + " MB" in row
    assert f"{results['figures']['build_rss_growth']['median']:+.1%}" in row
    doc = _flat(report.DOC.read_text())
    assert f"8,000 images of {px} x {px} px (`build_image_px`" in doc


def test_profile_results_cover_the_step_they_describe():
    """The profile file holds the real-size step: the groups share out the whole self CPU time."""
    section = _json(report.RESULTS / report.PROFILE)["sections"]["profile"]
    assert section["setup"]["preset"] == "resnet50-gpt2" and section["steps"] >= 3
    assert sum(group["fraction"] for group in section["groups"]) == pytest.approx(1.0)
    assert section["groups"] == sorted(section["groups"], key=lambda group: -group["fraction"])


def test_readme_performance_ratios_are_latest_json():
    """The README's one-line summary of the CPU figures rounds the medians of latest.json."""
    figures = _json(report.RESULTS / report.FIGURES)["figures"]
    summary = _flat(README.split("## Performance", 1)[1])
    expected = {
        "Training": figures["train_speedup_vs_seed"]["median"],
        "beam search": figures["beam_speedup_vs_nocache"]["median"],
        "data loading": figures["data_speedup_vs_png"]["median"],
    }
    for what, median in expected.items():
        assert f"{what} {median:.1f}x" in summary, what


def test_training_doc_floor_figures_are_the_demo_results():
    """docs/TRAINING.md's demo floors (test against nearest-train and grey images, over three seeds) are
    benchmarks/results/demo.json's seed summary."""
    summary = _json(REPO_ROOT / "benchmarks" / "results" / "demo.json")["seeds"]["summary"]
    doc = _flat((REPO_ROOT / "docs" / "TRAINING.md").read_text())

    def mean_std(split, metric="ce_macro_f1"):
        return f"{summary[split][metric]['mean']:.3f} ± {summary[split][metric]['std']:.3f}"

    assert (
        f"test `ce_macro_f1` is {mean_std('test')} against {mean_std('test_nearest_train')} for its "
        f"nearest-train floor and {mean_std('test_image_ablated')} for grey images" in doc
    )
    cider = [
        summary[split]["cider"]["mean"] for split in ("test", "test_nearest_train", "test_image_ablated")
    ]
    assert f"(CIDEr {cider[0]:.2f} against {cider[1]:.2f} and {cider[2]:.2f}" in doc


def test_demo_times_and_unseen_finding_sets_are_the_demo_results():
    """docs/TRAINING.md's main-job times (bf16, and AVX2 kernels in fp32) and the README's fraction of test studies
    whose finding set no training study shows are those of benchmarks/results/demo.json's main job."""
    demo = _json(REPO_ROOT / "benchmarks" / "results" / "demo.json")
    doc = _flat((REPO_ROOT / "docs" / "TRAINING.md").read_text())
    bf16, fp32 = demo["main_job"]["wall_s"], demo["main_job_avx2_fp32"]["wall_s"]
    assert (
        f"took {bf16:.0f} s there with bf16 autocast and {fp32:.0f} s restricted to AVX2 kernels in fp32"
        in doc
    )
    unseen = demo["main_job"]["finding_sets"]["test_unseen_in_train"]
    assert f"cannot describe the {unseen:.0%} of test studies" in _flat(README)


def _macro_row(label: str) -> list[str]:
    line = next(line for line in METRIC_README.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip("* ") for cell in line.strip("|").split("|")[1:]]


def test_metric_readme_agreement_tables_are_the_results_files():
    """The macro F1 table (rules as of ee554a4 and now, on all / held-out / rest) and the per-observation table
    are the committed agreement files; so are the counts the prose quotes."""
    now = _json(METRIC_RESULTS / "mesh_agreement.json")
    before = _json(METRIC_RESULTS / "mesh_agreement_ee554a4_rules.json")
    for label, record in (
        ("rules as of ee554a4", before),
        ("now (CheXpert's hedge and No Finding rules)", now),
    ):
        subsets = record["subsets"]
        assert _macro_row(label) == [f"{subsets[s]['macro_f1']:.3f}" for s in ("all", "held_out", "rest")]
        assert record["commit"] and record["machine"]
    for row in now["subsets"]["all"]["rows"]:
        precision = row["both"] / row["labeler_positive"] if row["labeler_positive"] else 0.0
        recall = row["both"] / row["mesh_positive"] if row["mesh_positive"] else 0.0
        cells = [row["mesh_positive"], row["labeler_positive"], row["both"]]
        expected = [str(c) for c in cells] + [f"{precision:.3f}", f"{recall:.3f}", f"{row['f1']:.3f}"]
        assert _macro_row(row["observation"]) == expected, row["observation"]
    text = _flat(METRIC_README)
    assert f"({before['subsets']['all']['macro_f1']:.3f} -> {now['subsets']['all']['macro_f1']:.3f}" in text
    assert f"No Finding is now 1 on only {now['subsets']['all']['no_finding_1']} of the" in text
    held_out = {r["observation"]: r for r in now["subsets"]["held_out"]["rows"]}
    rest = {r["observation"]: r for r in now["subsets"]["rest"]["rows"]}
    lesion, ptx = "Lung Lesion", "Pneumothorax"
    assert (
        f"Lung Lesion has {held_out[lesion]['mesh_positive']} MeSH positives there, "
        f"{rest[lesion]['mesh_positive']} in the rest; Pneumothorax {held_out[ptx]['mesh_positive']} and "
        f"{rest[ptx]['mesh_positive']}" in text
    )


def test_header_of_the_macro_table_counts_the_reports():
    """The macro table's header counts the reports of each subset as the agreement file does."""
    now = _json(METRIC_RESULTS / "mesh_agreement.json")["subsets"]
    header = next(
        line for line in METRIC_README.splitlines() if line.startswith("| macro F1 (8 observations) |")
    )
    assert header == (
        f"| macro F1 (8 observations) | all ({now['all']['n']}) | held out ({now['held_out']['n']}) "
        f"| rest ({now['rest']['n']}) |"
    )


def test_metric_readme_what_if_scores_are_the_what_if_file():
    """The agreement under rules the labeler does not follow, and the disagreement counts by label, are
    `mesh_agreement --what_if`'s committed file."""
    record = _json(METRIC_RESULTS / "mesh_agreement_what_if.json")
    assert record["commit"] and record["machine"]
    macro = {name: subsets["all"] for name, subsets in record["macro_f1"].items()}
    now = _json(METRIC_RESULTS / "mesh_agreement.json")["subsets"]["all"]["macro_f1"]
    assert macro["now"] == now  # the same labeler as the agreement file
    text = _flat(METRIC_README)
    assert (
        f'({macro["now"]:.3f} -> {macro["without_or_rule"]:.3f} without the "or" rule, '
        f"{macro['without_always_uncertain_phrases']:.3f} without the always-uncertain phrases, "
        f"{macro['without_or_rule_and_always_uncertain_phrases']:.3f} without both; "
        f"{macro['uncertain_positive']:.3f} counting every uncertain label as positive" in text
    )
    found = record["disagreements"]
    atelectasis = found["Atelectasis"]["mesh_only_by_label"]
    assert set(atelectasis) == {"-1"}
    assert f"*Atelectasis* ({atelectasis['-1']} studies coded atelectasis, labelled -1)" in text
    edema = found["Edema"]["mesh_only_by_label"]
    assert (
        f"*Edema* ({sum(edema.values())} coded Pulmonary Congestion or Edema, labelled -1 or unmentioned)"
        in text
    )
    assert set(edema) <= {"-1", "none"}
    assert f"*Lung Lesion* ({found['Lung Lesion']['labeler_only']} labelled positive, not coded" in text
    assert f"*Fracture* ({found['Fracture']['labeler_only']} labelled positive, not coded)" in text
    assert (
        f"*Cardiomegaly* ({found['Cardiomegaly']['mesh_only_by_label'].get('-1', 0)} coded, labelled -1)"
        in text
    )


def test_readme_labeler_agreement_is_the_results_file():
    """The README's Limits quote the labeler's agreement on all reports, the held-out third and the rest."""
    subsets = _json(METRIC_RESULTS / "mesh_agreement.json")["subsets"]
    text = _flat(README)
    assert (
        f"human MeSH coding of {subsets['all']['n']} real reports its macro F1 over 8 observations is "
        f"{subsets['all']['macro_f1']:.3f}: {subsets['held_out']['macro_f1']:.3f} on a fixed held-out third, "
        f"{subsets['rest']['macro_f1']:.3f} on the rest" in text
    )


def test_performance_doc_peaks_are_the_gpu_table():
    """The datasheet peaks docs/PERFORMANCE.md lists are `benchmarks/gpu.py`'s table, which computes MFU."""
    from benchmarks.gpu import PEAK_TFLOPS

    peaks = {label: tflops for _, label, _, tflops in PEAK_TFLOPS}
    doc = _flat(report.DOC.read_text())
    listed = {
        "H100 SXM": "H100 SXM",
        "H100 PCIe": "H100 PCIe",
        "H100 NVL": "H100 NVL",
        "H200": "H200 SXM / GH200",
        "A100": "A100",
        "L40S": "L40S",
        "L4": "L4",
        "A10": "A10",
        "V100": "V100 SXM2",
        "T4": "T4",
    }
    for name, label in listed.items():
        assert re.search(rf"\b{re.escape(name)} {peaks[label]:g}\b", doc), name
    assert f"(PCIe {peaks['V100 PCIe']:g})" in doc


def test_mimic_study_count_and_demo_time_are_their_sources():
    """MIMIC-CXR's study count is the one the scale projection uses; the README's demo time bound holds for the
    main job timed in demo.json, as this machine runs it and restricted to AVX2 kernels in fp32."""
    from benchmarks.scale_report import MIMIC_STUDIES

    assert f"{MIMIC_STUDIES:,} studies" in _flat(README)
    assert f"MIMIC-CXR-JPG has {MIMIC_STUDIES:,} studies" in _flat(report.DOC.read_text())
    demo = _json(REPO_ROOT / "benchmarks" / "results" / "demo.json")
    assert "It takes under 10 minutes on a 2-core CPU" in _flat(README)
    assert demo["main_job"]["wall_s"] < 600 and demo["main_job_avx2_fp32"]["wall_s"] < 600
    assert demo["machine"]["cpu_count"] == 2


def test_performance_doc_describes_the_settings_and_targets_the_harness_uses():
    """The sizes, repeats and targets docs/PERFORMANCE.md describes are those of latest.json's run and of the
    harness's own tables (`run.TARGETS`, `gpu.GpuSettings.from_config()`, configs/iu_r2gen.yaml)."""
    import yaml

    from benchmarks import run
    from benchmarks.gpu import GpuSettings

    settings = _json(report.RESULTS / report.FIGURES)["settings"]
    doc = _flat(report.DOC.read_text())
    assert (
        f"samples per second at batch {settings['batch_size']} with {settings['text_tokens']} report tokens"
        in doc
    )
    assert f"spread over {settings['amortize_epochs']} epochs" in doc
    assert (
        f"{settings['num_beams']} beams, exactly {settings['new_tokens']} new tokens, batch {settings['batch_size']}"
        in doc
    )
    low, high = settings["full_size"]
    assert f"the original {low:,}-{high:,} px PNGs" in doc
    assert f"({settings['matmul_size']:,} x {settings['matmul_size']:,})" in doc
    sizes = settings["build_sizes"]
    assert f"{', '.join(f'{n:,}' for n in sizes[:-1])} and {sizes[-1]:,} images" in doc
    rows = {
        line.split("|")[1].strip(): line
        for line in report.DOC.read_text().splitlines()
        if line.startswith("| ")
    }
    for name, text in (
        ("train_speedup_vs_seed", "Training throughput"),
        ("beam_speedup_vs_nocache", "Beam search"),
        ("data_speedup_vs_png", "Data loading"),
    ):
        op, bound = run.TARGETS[name]
        assert rows[text].strip(" |").split(" | ")[-1].startswith(f"{op} {bound:g}x"), name
    op, bound = run.TARGETS["build_rss_growth"]
    assert f"growth {op} {bound:+.0%}" in doc

    gpu = GpuSettings.from_config()
    assert (
        f"training batch {gpu.batch_size} with {gpu.text_tokens} report tokens" in doc
        and f"evaluation batch {gpu.eval_batch_size}" in doc
        and f"beam {gpu.num_beams} forced to exactly {gpu.new_tokens} new tokens" in doc
    )
    config = yaml.safe_load((REPO_ROOT / "configs" / "iu_r2gen.yaml").read_text())
    epochs, train, val, test = config["num_train_epochs"], 2069, 296, 590
    assert f"{epochs} epochs" in doc
    assert f"{epochs * train:,} samples from cached features" in doc
    assert f"{epochs * val:,} studies, beam 3" in doc and f"{2 * test:,} studies, beam 3" in doc
