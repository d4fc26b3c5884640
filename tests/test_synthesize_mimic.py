"""`python -m dataset_builder synthesize --format mimic-cxr`: phantom studies in the official MIMIC-CXR-JPG
layout that `build --format mimic-cxr` reads back, with the same findings as the Indiana phantoms."""

import gzip
import hashlib
import json
import re

import datasets
import pytest
from xraycap.dataset_builder import build_dataset, synthesize
from xraycap.dataset_builder.__main__ import main as cli_main
from xraycap.dataset_builder.mimic_cxr import METADATA_CSV, SPLIT_CSV, parse_report
from xraycap.dataset_builder.synthesize_mimic import synthesize_mimic

NUM_STUDIES = 30


@pytest.fixture(scope="module")
def mimic_phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("mimic") / "data"
    argv = [
        "synthesize",
        "--format",
        "mimic-cxr",
        "--output_dir",
        str(out),
        "--num_studies",
        str(NUM_STUDIES),
    ]
    assert cli_main(argv + ["--seed", "5", "--image_size", "96", "--num_proc", "1"]) == 0
    return out


def _tree_digest(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_official_layout(mimic_phantoms, capsys):
    root = mimic_phantoms
    split = gzip.decompress((root / SPLIT_CSV).read_bytes()).decode().splitlines()
    metadata = gzip.decompress((root / METADATA_CSV).read_bytes()).decode().splitlines()
    assert split[0] == "dicom_id,study_id,subject_id,split" and len(split) == 1 + 2 * NUM_STUDIES
    assert metadata[0].startswith("dicom_id,subject_id,study_id,") and "ViewPosition" in metadata[0]
    rows = [line.split(",") for line in split[1:]]
    assert {r[3] for r in rows} == {"train", "validate", "test"}
    by_patient = {}
    for dicom, study, subject, value in rows:
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", dicom)
        jpg = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        assert jpg.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
        by_patient.setdefault(subject, set()).add(value)
    assert all(len(values) == 1 for values in by_patient.values())  # split by patient
    reports = sorted(root.glob("files/p1*/p*/s*.txt"))
    assert len(reports) == NUM_STUDIES
    sections = parse_report(reports[0].read_text())
    assert sections["findings"] and sections["impression"] and sections["indication"]


def test_round_trip_through_build_matches_the_indiana_phantoms(mimic_phantoms, tmp_path):
    ds, report = build_dataset(
        mimic_phantoms,
        data_format="mimic-cxr",
        image_size=64,
        xxxx="drop",
        cache_dir=tmp_path / "c",
        num_proc=2,
    )
    assert report["accounting"]["adds_up"] and report["skipped"] == []
    assert sum(report["num_examples"].values()) == NUM_STUDIES
    assert all(e["projections"] == ["Frontal", "Lateral"] for name in ds for e in ds[name])
    # the same studies as `synthesize` draws: study_id 50000000 + i is Indiana uid i + 1
    indiana = synthesize(tmp_path / "indiana", NUM_STUDIES, seed=5, image_size=96, num_proc=1)
    ids, _ = build_dataset(indiana, image_size=64, xxxx="drop", cache_dir=tmp_path / "c", num_proc=1)
    expected = {str(int(e["uid"]) - 1 + 50_000_000): e["report"] for name in ids for e in ids[name]}
    built = {e["uid"]: e["report"] for name in ds for e in ds[name]}
    assert built == expected


def test_same_seed_same_bytes_whatever_the_workers(mimic_phantoms, tmp_path, capsys):
    again = synthesize_mimic(tmp_path / "again", NUM_STUDIES, seed=5, image_size=96, num_proc=2)
    assert _tree_digest(again) == _tree_digest(mimic_phantoms)
    assert synthesize_mimic(again, NUM_STUDIES, seed=5, image_size=96) == again  # same settings: reused
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize_mimic(again, NUM_STUDIES, seed=6, image_size=96)


def test_cli_build_reads_what_synthesize_wrote(mimic_phantoms, tmp_path, capsys):
    out = tmp_path / "built"
    argv = ["build", "--format", "mimic-cxr", "--data_dir", str(mimic_phantoms), "--output_dir", str(out)]
    assert cli_main(argv + ["--image_size", "48", "--cache_dir", str(tmp_path / "c"), "--num_proc", "2"]) == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["num_proc"] == 2 and report["accounting"]["adds_up"]
    assert datasets.load_from_disk(str(out))["train"].num_rows == report["num_examples"]["train"]
