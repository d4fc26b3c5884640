"""Scale: the full Indiana CSV structure (3,851 studies, 7,466 images) with placeholder PNGs builds the R2Gen
splits, saves a `load_from_disk`-able DatasetDict, and its peak memory barely grows from 1,000 images.

The structure reproduces the real counts that matter: 3,337 studies with findings, of which 2,955 have
>= 2 images (146 of those have a third image), 382 with findings and one image, 514 without findings
(two images each): 2,955 * 2 + 146 + 382 + 514 * 2 = 7,466 projection rows.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# The build's own peak RSS (VmHWM): getrusage's ru_maxrss would carry over the parent's peak across fork + exec.
RUNNER = """
import sys
from xraycap.dataset_builder.__main__ import main
rc = main(sys.argv[1:])
status = open("/proc/self/status").read().splitlines()
print("PEAK_RSS_KB", next(line.split()[1] for line in status if line.startswith("VmHWM:")))
sys.exit(rc)
"""


def make_structure(root: Path, n_pair: int, n_triple: int, n_single: int, n_empty: int) -> tuple[int, int]:
    """Writes the Kaggle layout: n_pair studies with findings + 2 images (the first n_triple of them get a
    second frontal), n_single with findings + 1 image, n_empty without findings + 2 images."""
    images = root / "images" / "images_normalized"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    variants = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8)).save(buf, format="PNG")
        variants.append(buf.getvalue())
    reports = ["uid,MeSH,Problems,image,indication,comparison,findings,impression\n"]
    projections = ["uid,filename,projection\n"]
    uid = 0
    n_rows = 0

    def add(has_findings: bool, views: list[str]):
        nonlocal uid, n_rows
        uid += 1
        findings = f'"Heart size is normal.\nThe lungs are clear, study {uid}."' if has_findings else ""
        reports.append(
            f"{uid},normal,normal,Xray Chest PA and Lateral,XXXX pain,None.,{findings},No acute disease.\n"
        )
        for k, view in enumerate(views):
            name = f"{uid}_IM-{uid:04d}-{k + 1}001.dcm.png"
            projections.append(f"{uid},{name},{view}\n")
            (images / name).write_bytes(variants[(uid + k) % len(variants)])
            n_rows += 1

    for i in range(n_pair):
        add(True, ["Frontal", "Lateral", "Frontal"] if i < n_triple else ["Frontal", "Lateral"])
    for _ in range(n_single):
        add(True, ["Frontal"])
    for _ in range(n_empty):
        add(False, ["Frontal", "Lateral"])
    (root / "indiana_reports.csv").write_text("".join(reports))
    (root / "indiana_projections.csv").write_text("".join(projections))
    return uid, n_rows


def run_build(data: Path, out: Path, cache: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-c", RUNNER, "build", "--data_dir", str(data), "--output_dir", str(out)]
    cmd += ["--r2gen", "--cache_dir", str(cache), "--writer_batch_size", "64"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss_kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    return json.loads((out / "build_report.json").read_text()), rss_kb / 1024


def test_full_indiana_structure_builds_r2gen_splits_in_bounded_memory(tmp_path):
    """The R2Gen population and split sizes of the real collection (2,955 -> 2,069 / 296 / 590), every row
    accounted for, no study in two splits, and a peak RSS at 7,466 images within 25% of that at 1,000."""
    n_studies, n_rows = make_structure(
        tmp_path / "full", n_pair=2955, n_triple=146, n_single=382, n_empty=514
    )
    assert (n_studies, n_rows) == (3851, 7466)
    small_studies, small_rows = make_structure(
        tmp_path / "small", n_pair=400, n_triple=20, n_single=50, n_empty=65
    )
    assert small_rows == 1000

    small, rss_small = run_build(tmp_path / "small", tmp_path / "small_out", tmp_path / "cache")
    full, rss_full = run_build(tmp_path / "full", tmp_path / "full_out", tmp_path / "cache")
    print(
        f"peak RSS: {rss_small:.0f} MB at 1,000 images, {rss_full:.0f} MB at 7,466 images; {full['seconds']} s"
    )

    assert full["num_reports"] == 3851 and full["num_projection_rows"] == 7466
    assert full["num_examples"] == {"train": 2069, "validation": 296, "test": 590}
    assert small["num_examples"] == {"train": 280, "validation": 40, "test": 80}
    assert full["skipped_by_reason"] == {
        "empty target section": 514 + 1028,
        "too few usable images": 382 + 382,
        "view not selected": 146,
    }
    assert full["accounting"]["adds_up"]

    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "full_out"))
    uids = {split: set(ds[split]["uid"]) for split in ds}
    assert sum(len(u) for u in uids.values()) == 2955
    assert not (
        uids["train"] & uids["validation"]
        or uids["train"] & uids["test"]
        or uids["validation"] & uids["test"]
    )

    assert rss_full < 1536, f"peak RSS {rss_full:.0f} MB"
    assert rss_full < 1.25 * rss_small, f"peak RSS grew from {rss_small:.0f} MB to {rss_full:.0f} MB"
