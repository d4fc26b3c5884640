"""The scale section of the benchmark harness: phantom MIMIC-CXR builds of growing size, and the table and projection
it writes into docs/PERFORMANCE.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run, scale_report  # noqa: E402


def _row(studies, t1, tp, rss1, rssp, train, disk):
    build = {"output_bytes": disk // 2, "output_and_cache_bytes": disk}
    return {
        "studies": studies,
        "datasets_identical": True,
        "build_num_proc_1": {"num_proc": 1, "seconds": t1, "peak_rss_mb": rss1, "peak_pss_mb": rss1, **build},
        "build_all_cores": {
            "num_proc": 2,
            "seconds": tp,
            "peak_rss_mb": rssp,
            "peak_pss_mb": rssp - 50,
            **build,
        },
        "train_cache_features": {
            "steps": 3,
            "batch_size": 16,
            "peak_rss_mb": train + 500,
            "peak_pss_mb": train,
        },
    }


def test_projection_to_mimic_size_shows_its_arithmetic():
    rows = [
        _row(1000, 10.0, 6.0, 200.0, 300.0, 1000.0, 10_000_000),
        _row(4000, 40.0, 22.0, 212.0, 320.0, 1030.0, 40_000_000),
        _row(16000, 160.0, 88.0, 260.0, 380.0, 1150.0, 160_000_000),
    ]
    found = {name: (arithmetic, value) for name, arithmetic, value in scale_report.projections(rows)}
    # 160 s / 16,000 studies x 227,835 = 0.63 h on one core; Amdahl: serial 2 x 88 - 160 = 16 s of 160 s (0.10),
    # the rest split over 16 cores
    one_core_h = 160 / 16000 * 227_835 / 3600
    assert found["build time, 16 processes"][1] == f"{one_core_h * (0.1 + 0.9 / 16):.2f} h"
    assert "0.63 h on one core" in found["build time, 16 processes"][0]
    assert "16.0 s of 160.0 s" in found["build time, 16 processes"][0]
    # PSS: fit 1 proc (slope 0.004 MB per study) + 15 x (330 - 260) / (2 - 1) MB for the further processes
    assert scale_report.linear_fit([1000, 4000, 16000], [200.0, 212.0, 260.0]) == pytest.approx(
        (196.0, 0.004)
    )
    expected = (196.0 + 0.004 * 227_835 + 15 * 70.0) / 1024
    assert found["build peak memory (PSS of the tree), 16 processes"][1] == f"{expected:.1f} GB"
    assert found["build disk (output + cache)"][1] == f"{10_000 * 227_835 / 1e9:.1f} GB"  # 10 kB a study
    intercept, slope = scale_report.linear_fit([1000, 4000, 16000], [1000.0, 1030.0, 1150.0])
    assert (
        found["training peak memory (PSS of the tree), --cache_features, one process and its workers"][1]
        == f"{(intercept + slope * 227_835) / 1024:.1f} GB"
    )


def test_the_doc_table_is_generated_from_the_results_file(tmp_path):
    results = {
        "machine": {
            "cpu": "Test CPU", "cpu_count": 2, "memory_gib": 8.0, "git_commit": "abcdef0123",
            "git_uncommitted_changes": False, "measured_at_utc": "2026-01-01T00:00:00+00:00",
            "load_average": [0.1, 0.1, 0.1], "cpu_flags": {"avx512_bf16": True, "amx_bf16": False, "amx_tile": False},
        },  # fmt: skip
        "sections": {
            "scale": {
                "rows": [_row(40, 2.0, 1.5, 150.0, 250.0, 900.0, 400_000), _row(80, 3.0, 2.0, 151.0, 252.0, 901.0, 800_000)],
                "figures": {
                    "build_speedup_all_cores": {"median": 1.5, "what": "build speedup", "xraycap": "2.0 s", "baseline": "3.0 s"}
                },
            }
        },
    }  # fmt: skip
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(f"# Perf\n\nbefore\n{scale_report.DOC_BEGIN}\nstale\n{scale_report.DOC_END}\nafter\n")
    scale_report.write_doc(results, doc)
    text = doc.read_text()
    assert text.startswith("# Perf\n\nbefore\n") and text.endswith(f"{scale_report.DOC_END}\nafter\n")
    assert "stale" not in text and scale_report.doc_block(doc) == scale_report.render_markdown(results)
    assert "| 80 | 3.0 | 2.0 | 1.50x | yes | 151 | 252 / 202 | 0.4 | 0.8 | 1401 / 901 |" in text
    assert "A proving run at 40, 80 studies, not the measurement" in text
    assert "avx512_bf16 yes, amx_bf16 no" in text


def test_performance_doc_matches_the_committed_scale_results():
    results = json.loads(scale_report.RESULTS_FILE.read_text())
    assert scale_report.doc_block() == scale_report.render_markdown(results), (
        "docs/PERFORMANCE.md's scale table is stale: run `python -m benchmarks.scale_report`"
    )
    assert results["sections"]["scale"]["rows"] and results["machine"]["git_commit"]


def test_scale_sizes_are_parsed_and_checked(capsys):
    assert run.parse_args(["--sections", "scale", "--scale_sizes", "40,80"]).scale_sizes == (40, 80)
    assert run.parse_args(["--sections", "scale"]).output.endswith("results/scale.json")
    with pytest.raises(SystemExit):
        run.parse_args(["--sections", "scale", "--scale_sizes", "40,many"])
    assert "--scale_sizes '40,many'" in capsys.readouterr().err


def _has_mimic_synthesis() -> bool:
    help_text = subprocess.run(
        [sys.executable, "-m", "dataset_builder", "synthesize", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    ).stdout
    return "--format" in help_text


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_mimic_synthesis(), reason="dataset_builder synthesize has no --format mimic-cxr here"
)
def test_scale_section_at_tiny_sizes_builds_identical_datasets_and_measures_each_size(tmp_path):
    output = tmp_path / "scale.json"
    assert run.main(["--sections", "scale", "--scale_sizes", "40,60", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    rows = results["sections"]["scale"]["rows"]
    assert [row["studies"] for row in rows] == [40, 60]
    for row in rows:
        assert row["datasets_identical"] is True
        for key in ("build_num_proc_1", "build_all_cores", "train_cache_features"):
            assert row[key]["seconds"] > 0 and row[key]["peak_rss_mb"] > 50, (key, row[key])
        assert 0 < row["build_all_cores"]["output_bytes"] <= row["build_all_cores"]["output_and_cache_bytes"]
        assert row["train_cache_features"]["feature_cache_bytes"] > 0  # the features went to disk
    assert set(results["machine"]["cpu_flags"]) == {"avx512_bf16", "amx_bf16", "amx_tile"}
    # A results file elsewhere leaves docs/PERFORMANCE.md alone; its table renders from this one too.
    assert "| 60 |" in scale_report.render_markdown(results)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="reads /proc (Linux)")
def test_measured_run_tells_anonymous_memory_from_mapped_file_pages(tmp_path):
    """A process that fills 200 MB of its heap shows it as RssAnon; one that reads a 200 MB file through a memory
    map shows it as RssFile (page cache, not memory it holds); each peak sits beside RSS and PSS."""
    from benchmarks.scale import measured_run

    hold = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    anon = measured_run([sys.executable, "-c", hold], cwd=tmp_path)
    data = tmp_path / "data.bin"
    data.write_bytes(b"\1" * (200 * 2**20))
    read = (
        f"import mmap, time; f = open({str(data)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
        "s = sum(m[i] for i in range(0, len(m), 4096)); time.sleep(0.5)"
    )
    mapped = measured_run([sys.executable, "-c", read], cwd=tmp_path)
    assert anon["peak_rss_anon_mb"] > 200 and anon["peak_rss_file_mb"] < 100, anon
    assert mapped["peak_rss_file_mb"] > 200 and mapped["peak_rss_anon_mb"] < 100, mapped
    for peaks in (anon, mapped):
        assert peaks["peak_rss_mb"] >= max(peaks["peak_rss_anon_mb"], peaks["peak_rss_file_mb"])
        assert peaks["peak_pss_mb"] > 200 and peaks["peak_pss_file_mb"] + peaks["peak_pss_anon_mb"] > 200


def test_the_doc_shows_anonymous_and_file_backed_peaks_where_measured():
    """Rows measured with the kinds get a table of RssAnon / RssFile (and PSS) peaks and the note on what file pages
    are; rows measured before the kinds were recorded render without it."""
    rows = [
        _row(40, 2.0, 1.5, 150.0, 250.0, 900.0, 400_000),
        _row(80, 3.0, 2.0, 151.0, 252.0, 901.0, 800_000),
    ]
    assert scale_report.memory_kinds(rows) == []
    for scale_factor, row in enumerate(rows, 1):
        for key in ("build_all_cores", "train_cache_features"):
            row[key] |= {
                "peak_rss_anon_mb": 100.0 * scale_factor,
                "peak_rss_file_mb": 40.0 * scale_factor,
                "peak_pss_anon_mb": 60.0,
                "peak_pss_file_mb": 20.0,
            }
    text = "\n".join(scale_report.memory_kinds(rows))
    assert "| 80 | 200 / 80 | 60 / 20 | 200 / 80 | 60 / 20 |" in text
    assert "page cache" in text and "reclaims" in text
