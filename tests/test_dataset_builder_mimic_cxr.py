"""`build --format mimic-cxr` on a small synthetic tree in the official MIMIC-CXR-JPG layout.

The tree (written here; no MIMIC data is used) holds eight studies of five patients, with the official file
names: gzipped split and metadata tables, `files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg` and one report `.txt`
per study beside its folder. Frontal JPEGs are 48 x 64 px and lateral ones 64 x 48, so the order of a study's
images shows in their sizes.

study     patient    split     images (split-CSV order)                    what it tests
50000001  10000001   train     LATERAL, PA                                 frontal first; wrapped FINDINGS
50000002  10000001   train     AP                                          no FINDINGS: skipped in a findings build
50000007  10000001   train     LAO, LATERAL, AP, PA                        --views; other projections
50000003  10000002   validate  PA (file absent), LATERAL                   a missing image; validate -> validation
50000006  12000004   validate  PA (file absent)                            a row whose image does not exist
50000004  11000003   test      PA (truncated JPEG), LL                     a corrupt image (found while encoding)
50000005  11000003   test      LATERAL                                     a lateral-only study
50000008  13000005   test      PA                                          no report file
"""

import gzip
import io
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from xraycap.dataset_builder import build_dataset, synthesize
from xraycap.dataset_builder.__main__ import main as cli_main
from xraycap.dataset_builder.configuration import ChestXrayConfig
from xraycap.dataset_builder.mimic_cxr import ANON_TOKEN, make_plan, parse_report
from xraycap.dataset_builder.text_cleaning import XXXX_MARKER, clean_text

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
FRONTAL_SIZE, LATERAL_SIZE = (48, 64), (64, 48)

# (study, patient, split, [(dicom_id, ViewPosition, file: "ok" | "absent" | "truncated")])
STUDIES = [
    ("50000001", "10000001", "train", [("d1lat", "LATERAL", "ok"), ("d1pa", "PA", "ok")]),
    ("50000002", "10000001", "train", [("d2ap", "AP", "ok")]),
    (
        "50000007",
        "10000001",
        "train",
        [("d7lao", "LAO", "ok"), ("d7lat", "LATERAL", "ok"), ("d7ap", "AP", "ok"), ("d7pa", "PA", "ok")],
    ),
    ("50000003", "10000002", "validate", [("d3pa", "PA", "absent"), ("d3lat", "LATERAL", "ok")]),
    ("50000006", "12000004", "validate", [("d6pa", "PA", "absent")]),
    ("50000004", "11000003", "test", [("d4pa", "PA", "truncated"), ("d4ll", "LL", "ok")]),
    ("50000005", "11000003", "test", [("d5lat", "LATERAL", "ok")]),
    ("50000008", "13000005", "test", [("d8pa", "PA", "ok")]),
]

FINDINGS_1 = (
    "PA and lateral views of the chest were provided.  The lungs are well\n"
    "   expanded and clear, without focal consolidation, effusion or\n"
    "   pneumothorax.\n"
    " \n"
    "   The cardiomediastinal silhouette is within normal limits."
)
REPORTS = {
    "50000001": (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n \n"
        " INDICATION:  ___-year-old woman with cough.  // eval for pneumonia\n \n"
        " TECHNIQUE:  Chest PA and lateral\n \n"
        " COMPARISON:  ___\n \n"
        f" FINDINGS:\n \n   {FINDINGS_1}\n \n"
        " IMPRESSION:\n \n   No acute cardiopulmonary process.\n"
    ),
    "50000002": (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PORTABLE AP)\n \n"
        " INDICATION:  Chest pain.\n \n"
        " COMPARISON:  Chest radiograph from ___.\n \n"
        " IMPRESSION:  Heart size is normal.  No pneumothorax or\n"
        "   large pleural effusion.\n"
    ),
    "50000003": " FINDINGS:  Mild cardiomegaly.\n \n IMPRESSION:  Cardiomegaly, unchanged.\n",
    "50000004": " FINDINGS:  Small left pleural effusion.\n \n IMPRESSION:  Left effusion.\n",
    "50000005": " FINDINGS:  Lateral view only.  No effusion.\n \n IMPRESSION:  Normal.\n",
    "50000006": " FINDINGS:  Clear lungs.\n \n IMPRESSION:  Normal.\n",
    "50000007": (
        " WET READ: ___ ___ 10:30 AM\n   Possible small effusion.\n \n"
        " FINDINGS:\n   Endotracheal tube ends 4 cm above the carina.\n   Lungs are clear.\n \n"
        " IMPRESSION:\n   Tube in standard position.\n"
    ),
}  # 50000008 has no report file


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_gz_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        fh.write(",".join(header) + "\n")
        fh.writelines(",".join(row) + "\n" for row in rows)


def write_mimic_tree(root: Path, reports_root: Path | None = None) -> Path:
    """Writes the synthetic MIMIC-CXR-JPG tree (reports inside it, or under `reports_root`)."""
    reports_root = reports_root or root
    split_rows, meta_rows = [], []
    for n, (study, patient, split, images) in enumerate(STUDIES):
        folder = root / "files" / f"p{patient[:2]}" / f"p{patient}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, (dicom, view, state) in enumerate(images):
            split_rows.append([dicom, study, patient, split])
            size = LATERAL_SIZE if view in ("LATERAL", "LL", "LAO") else FRONTAL_SIZE
            meta_rows.append(
                [dicom, patient, study, "CHEST (PA AND LAT)", view, str(size[1]), str(size[0])]
                + ["21800506", "213014.531", "Chest", view.title(), "Erect"]
            )
            data = _jpeg(size, 10 * n + k)
            if state == "ok":
                (folder / f"{dicom}.jpg").write_bytes(data)
            elif state == "truncated":
                (folder / f"{dicom}.jpg").write_bytes(data[: len(data) * 2 // 3])
        if study in REPORTS:
            report = reports_root / "files" / f"p{patient[:2]}" / f"p{patient}" / f"s{study}.txt"
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(REPORTS[study])
    _write_gz_csv(root / SPLIT_CSV, ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    meta_header = (
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
        "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
        "PatientOrientationCodeSequence_CodeMeaning"
    ).split(",")
    _write_gz_csv(root / METADATA_CSV, meta_header, meta_rows)
    return root


def _path(patient: str, study: str, dicom: str) -> str:
    return f"files/p{patient[:2]}/p{patient}/s{study}/{dicom}.jpg"


def _examples(ds) -> dict[str, dict]:
    return {e["uid"]: {**e, "split": name} for name in ds for e in ds[name]}


def _reasons(report) -> dict[tuple[str, str | None], str]:
    return {(s["uid"], s["filename"]): s["reason"] for s in report["skipped"]}


@pytest.fixture(scope="module")
def mimic_tree(tmp_path_factory) -> Path:
    return write_mimic_tree(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg")


@pytest.fixture(scope="module")
def cli_build(mimic_tree, tmp_path_factory):
    """`python -m dataset_builder build --format mimic-cxr` into `out`; returns (out, cache, report, stdout)."""
    root = tmp_path_factory.mktemp("built")
    out, cache = root / "out", root / "cache"
    argv = ["build", "--format", "mimic-cxr", "--data_dir", str(mimic_tree), "--output_dir", str(out)]
    assert cli_main(argv + ["--image_size", "32", "--cache_dir", str(cache)]) == 0
    return out, cache, json.loads((out / "build_report.json").read_text())


def test_cli_build_official_split_views_sections_and_skips(cli_build):
    out, _, report = cli_build
    ds = datasets.load_from_disk(str(out))
    examples = _examples(ds)
    # the official split (validate -> validation); every study in one split only
    assert {uid: e["split"] for uid, e in examples.items()} == {
        "50000001": "train",
        "50000007": "train",
        "50000003": "validation",
        "50000004": "test",
        "50000005": "test",
    }
    assert sum(ds[name].num_rows for name in ds) == len(examples) == 5
    assert report["num_examples"] == {"train": 2, "validation": 1, "test": 2}
    assert report["num_reports"] == 8 and report["num_projection_rows"] == 14
    # frontal first although the split CSV lists the lateral first
    first = examples["50000001"]
    assert first["projections"] == ["Frontal", "Lateral"]
    assert first["image_filenames"] == [
        _path("10000001", "50000001", "d1pa"),
        _path("10000001", "50000001", "d1lat"),
    ]
    assert [im.size for im in first["images"]] == [(24, 32), (32, 24)]  # re-encoded at 32 px, never enlarged
    assert first["images"][0].mode == "L"
    # pair: the first frontal (AP, in CSV order) and the lateral; PA and LAO not selected
    assert examples["50000007"]["image_filenames"] == [
        _path("10000001", "50000007", "d7ap"),
        _path("10000001", "50000007", "d7lat"),
    ]
    assert examples["50000005"]["projections"] == ["Lateral"]  # lateral-only study kept with views=pair
    assert examples["50000004"]["projections"] == ["Lateral"]  # its PA failed while encoding (LL = lateral)
    # sections: wrapped, indented FINDINGS joined; raw columns keep the lines, `report` is cleaned
    assert first["report"] == " ".join(FINDINGS_1.split())
    assert first["findings"].splitlines()[1] == "expanded and clear, without focal consolidation, effusion or"
    assert first["impression"] == "No acute cardiopulmonary process."
    assert first["indication"] == "___-year-old woman with cough.  // eval for pneumonia"
    assert first["mesh"] == first["problems"] == ""  # Indiana-only columns
    assert examples["50000007"]["report"] == "Endotracheal tube ends 4 cm above the carina. Lungs are clear."
    # every row and study accounted for, with its reason
    reasons = _reasons(report)
    assert (
        reasons[("50000002", None)]
        == reasons[("50000002", _path("10000001", "50000002", "d2ap"))]
        == ("empty target section")
    )
    assert reasons[("50000003", _path("10000002", "50000003", "d3pa"))] == "image file missing"
    assert reasons[("50000006", _path("12000004", "50000006", "d6pa"))] == "image file missing"
    assert reasons[("50000006", None)] == "too few usable images"
    assert reasons[("50000004", _path("11000003", "50000004", "d4pa"))] == "unreadable or truncated image"
    assert reasons[("50000008", None)] == "report file missing"
    assert reasons[("50000008", _path("13000005", "50000008", "d8pa"))] == "report file missing"
    assert reasons[("50000007", _path("10000001", "50000007", "d7pa"))] == "view not selected"
    assert reasons[("50000007", _path("10000001", "50000007", "d7lao"))] == "view not selected"
    assert len(report["skipped"]) == len(reasons) == 10
    assert report["accounting"]["adds_up"]
    assert report["options"]["data_format"] == "mimic-cxr" and "official split" in report["split_arithmetic"]


def test_same_schema_and_report_keys_as_an_indiana_build(cli_build, tmp_path):
    """run_captioning's `--dataset_dir` reads a saved build with `load_from_disk`: the MIMIC build has the
    columns and features of an Indiana (phantom) build, and its build_report.json the same keys."""
    out, _, report = cli_build
    phantom = synthesize(tmp_path / "phantom", num_studies=2, seed=0, image_size=64, num_proc=1)
    _, indiana_report = build_dataset(phantom, tmp_path / "indiana", image_size=32, cache_dir=tmp_path / "c")
    mimic, indiana = datasets.load_from_disk(str(out)), datasets.load_from_disk(str(tmp_path / "indiana"))
    assert list(mimic) == list(indiana) == ["train", "validation", "test"]
    for name in mimic:
        assert mimic[name].column_names == indiana[name].column_names
        assert mimic[name].features == indiana[name].features
    assert set(report) == set(indiana_report)
    assert set(report["options"]) == set(indiana_report["options"])


def test_rebuild_is_cached_and_a_changed_report_is_not(cli_build, mimic_tree, tmp_path, capsys):
    out, cache, first = cli_build
    argv = ["build", "--format", "mimic-cxr", "--data_dir", str(mimic_tree), "--image_size", "32"]
    assert cli_main(argv + ["--output_dir", str(tmp_path / "again"), "--cache_dir", str(cache)]) == 0
    again = json.loads((tmp_path / "again" / "build_report.json").read_text())
    assert again["reused_cache"] and again["num_images_encoded_this_run"] == 0
    assert again["fingerprint"] == first["fingerprint"] and again["skipped"] == first["skipped"]
    assert "reused the cache" in capsys.readouterr().out
    # a report's text is an input: editing one rebuilds
    report = mimic_tree / "files/p10/p10000002/s50000003.txt"
    original = report.read_text()
    try:
        report.write_text(original.replace("Mild cardiomegaly.", "Moderate cardiomegaly."))
        _, changed = build_dataset(mimic_tree, data_format="mimic-cxr", image_size=32, cache_dir=cache)
    finally:
        report.write_text(original)
    assert not changed["reused_cache"] and changed["fingerprint"] != first["fingerprint"]


def test_views_all_and_frontal(mimic_tree, tmp_path):
    ds, report = build_dataset(
        mimic_tree, data_format="mimic-cxr", views="all", image_size=32, cache_dir=tmp_path
    )
    study = _examples(ds)["50000007"]
    assert study["projections"] == ["Frontal", "Frontal", "Lateral", "LAO"]  # frontal first, then CSV order
    assert [Path(f).stem for f in study["image_filenames"]] == ["d7ap", "d7pa", "d7lat", "d7lao"]
    ds, report = build_dataset(
        mimic_tree, data_format="mimic-cxr", views="frontal", image_size=32, cache_dir=tmp_path
    )
    examples = _examples(ds)
    assert set(examples) == {"50000001", "50000007"}
    assert all(e["projections"] == ["Frontal"] for e in examples.values())
    reasons = _reasons(report)
    assert reasons[("50000005", None)] == reasons[("50000003", None)] == "no frontal view"
    assert reasons[("50000004", None)] == "too few usable images"  # its only frontal is the truncated JPEG
    assert report["accounting"]["adds_up"]


def test_impression_build_with_a_separate_reports_dir(tmp_path):
    data = write_mimic_tree(tmp_path / "jpg", reports_root=tmp_path / "reports")
    with pytest.raises(FileNotFoundError, match="--reports_dir"):
        build_dataset(data, data_format="mimic-cxr", image_size=32, cache_dir=tmp_path / "c")
    ds, report = build_dataset(
        data,
        data_format="mimic-cxr",
        reports_dir=tmp_path / "reports",
        section="impression",
        image_size=32,
        cache_dir=tmp_path / "c",
    )
    examples = _examples(ds)
    assert examples["50000002"]["split"] == "train"  # no FINDINGS, but an impression build keeps it
    assert examples["50000002"]["findings"] == ""
    assert (
        examples["50000002"]["report"] == "Heart size is normal. No pneumothorax or large pleural effusion."
    )
    assert report["options"]["reports_dir"] == str((tmp_path / "reports").resolve())
    assert report["accounting"]["adds_up"]


def test_indiana_only_options_are_refused_by_name(mimic_tree, tmp_path, capsys):
    for kwargs, flag in (
        ({"r2gen": True}, "--r2gen"),
        ({"split_file": mimic_tree / SPLIT_CSV}, "--split_file"),
    ):
        with pytest.raises(ValueError, match=f"\\({flag}\\) does not apply to data_format='mimic-cxr'"):
            build_dataset(mimic_tree, data_format="mimic-cxr", cache_dir=tmp_path, **kwargs)
        argv = [
            "build",
            "--format",
            "mimic-cxr",
            "--data_dir",
            str(mimic_tree),
            "--output_dir",
            str(tmp_path),
        ]
        with pytest.raises(SystemExit) as info:
            cli_main(argv + ([flag] if flag == "--r2gen" else [flag, "annotation.json"]))
        assert (
            info.value.code == 2 and f"{flag} does not apply to --format mimic-cxr" in capsys.readouterr().err
        )
    with pytest.raises(ValueError, match=r"\(--reports_dir\) does not apply to data_format='indiana'"):
        build_dataset(mimic_tree, reports_dir=mimic_tree, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="data_format must be one of"):
        build_dataset(mimic_tree, data_format="chexpert", cache_dir=tmp_path)


def test_layout_and_table_errors_name_the_file(mimic_tree, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mimic_tree, data)
    (data / SPLIT_CSV).unlink()
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz not found.*physionet"):
        build_dataset(data, data_format="mimic-cxr", cache_dir=tmp_path / "c")
    _write_gz_csv(data / SPLIT_CSV, ["dicom_id", "study_id", "split"], [["d1pa", "50000001", "train"]])
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['subject_id'\]"):
        build_dataset(data, data_format="mimic-cxr", cache_dir=tmp_path / "c")
    cfg = ChestXrayConfig(name="default", data_format="mimic-cxr")
    _write_gz_csv(
        data / SPLIT_CSV,
        ["dicom_id", "study_id", "subject_id", "split"],
        [["d1pa", "50000001", "10000001", "val"]],
    )
    with pytest.raises(
        ValueError, match=r"split 'val'; the official values are \['train', 'validate', 'test'\]"
    ):
        make_plan(cfg, data)
    rows = [["d1pa", "50000001", "10000001", "train"], ["d1lat", "50000001", "10000001", "test"]]
    _write_gz_csv(data / SPLIT_CSV, ["dicom_id", "study_id", "subject_id", "split"], rows)
    with pytest.raises(ValueError, match="study 50000001 is listed as"):
        make_plan(cfg, data)
    rows = [["d1pa", "../../50000001", "10000001", "train"]]
    _write_gz_csv(data / SPLIT_CSV, ["dicom_id", "study_id", "subject_id", "split"], rows)
    with pytest.raises(ValueError, match="study_id='../../50000001'.*must be numbers"):
        make_plan(cfg, data)


def test_parse_report_sections_and_anonymisation_token():
    sections = parse_report(REPORTS["50000001"])
    assert sections["findings"] == "\n".join(line.strip() for line in FINDINGS_1.splitlines())
    assert sections["impression"] == "No acute cardiopulmonary process."
    assert set(sections) == {"findings", "impression", "indication"}  # EXAMINATION, TECHNIQUE... are not kept
    no_findings = parse_report(REPORTS["50000002"])
    assert "findings" not in no_findings
    assert no_findings["impression"] == "Heart size is normal.  No pneumothorax or\nlarge pleural effusion."
    # the WET READ section ends nothing it should not; the last non-empty FINDINGS wins; CONCLUSION = impression
    text = " WET READ: ___ 10:30 AM\n   wet.\n FINDINGS:\n \n FINDINGS: Clear.\n CONCLUSION:  Normal.\n"
    assert parse_report(text) == {"findings": "Clear.", "impression": "Normal."}
    assert parse_report("no headers at all") == {}
    raw = "___-year-old man.  Compared to ___ at 10:30."
    assert (
        clean_text(raw, "marker", ANON_TOKEN)
        == f"{XXXX_MARKER}-year-old man. Compared to {XXXX_MARKER} at 10:30."
    )
    assert clean_text(raw, "keep", ANON_TOKEN) == "___-year-old man. Compared to ___ at 10:30."
