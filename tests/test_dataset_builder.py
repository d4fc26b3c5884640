"""dataset_builder on the real samples, splits, split files, text cleaning, cache reuse, CLI, download."""

import csv
import json
import os
from pathlib import Path

import datasets
import pytest
import xraycap.dataset_builder.images as images_module
from PIL import Image
from xraycap.dataset_builder import KAGGLE_HANDLE, build_dataset, download, synthesize
from xraycap.dataset_builder.__main__ import main as cli_main
from xraycap.dataset_builder.split_file import parse_r2gen_id
from xraycap.dataset_builder.splits import assign_splits, split_sizes
from xraycap.dataset_builder.text_cleaning import XXXX_MARKER, clean_text

SAMPLE_UIDS = {"3", "14", "20", "42", "103", "1000", "1001", "1002", "1003"}
EMPTY_FINDINGS = {"3", "1002"}


def _all_uids(ds) -> list[str]:
    return [u for split in ds for u in ds[split]["uid"]]


def _assert_adds_up(ds, report):
    """Every report row and every projection row is in an example or in `skipped`."""
    study_skips = [s for s in report["skipped"] if s["filename"] is None]
    row_skips = [s for s in report["skipped"] if s["filename"] is not None]
    n_examples = sum(ds[s].num_rows for s in ds)
    n_images = sum(len(p) for s in ds for p in ds[s]["projections"])
    assert n_examples + len(study_skips) == report["num_reports"]
    assert n_images + len(row_skips) == report["num_projection_rows"]
    assert report["accounting"]["adds_up"]
    assert sum(report["skipped_by_reason"].values()) == len(report["skipped"])


# ------------------------------------------------------------------ real samples


@pytest.fixture(scope="module")
def sample_dir(shared_data) -> Path:
    return shared_data / "iu_xray_sample"


def test_real_sample_findings(sample_dir, tmp_path):
    ds, report = build_dataset(sample_dir, tmp_path / "out", image_size=256, cache_dir=tmp_path / "cache")
    assert set(ds) == {"train", "validation", "test"}
    uids = _all_uids(ds)
    assert len(uids) == len(set(uids))  # no study in two splits
    assert set(uids) == SAMPLE_UIDS - EMPTY_FINDINGS
    study_skips = {s["uid"]: s["reason"] for s in report["skipped"] if s["filename"] is None}
    assert study_skips == {"3": "empty target section", "1002": "empty target section"}
    # their image rows are accounted for with the same reason
    assert {s["filename"] for s in report["skipped"] if s["uid"] in EMPTY_FINDINGS and s["filename"]} == {
        "3_IM-1384-1001.dcm.png",
        "3_IM-1384-2001.dcm.png",
        "1002_IM-0004-1001.dcm.png",
        "1002_IM-0004-2001.dcm.png",
    }
    # study 1000 has two frontals and a lateral: pair keeps the first frontal + the lateral
    ex = next(e for split in ds for e in ds[split] if e["uid"] == "1000")
    assert ex["image_filenames"] == ["1000_IM-0003-1001.dcm.png", "1000_IM-0003-2001.dcm.png"]
    assert ex["projections"] == ["Frontal", "Lateral"]
    for split in ds:
        for e in ds[split]:
            assert e["report"] == " ".join(e["findings"].split())
            for im in e["images"]:
                im.load()  # decodes
                assert im.mode == "L" and max(im.size) == 256  # originals are 2048-2934 px
    # the aspect ratio survives the resize (1000_IM-0003-1001 is 2048 x 2496)
    assert ex["images"][0].size == (210, 256)
    reloaded = datasets.load_from_disk(str(tmp_path / "out"))  # the save_to_disk layout
    assert {k: v.num_rows for k, v in reloaded.items()} == report["num_examples"]
    assert reloaded["train"][0]["images"][0].tobytes() == ds["train"][0]["images"][0].tobytes()
    saved = json.loads((tmp_path / "out" / "build_report.json").read_text())
    for key in ("num_reports", "num_projection_rows", "num_examples", "skipped"):
        assert key in saved
    assert saved["num_reports"] == 9 and saved["num_projection_rows"] == 13
    _assert_adds_up(ds, report)


def test_real_sample_impression_keeps_empty_findings(sample_dir, tmp_path):
    ds, report = build_dataset(
        sample_dir, section="impression", views="frontal", image_size=64, cache_dir=tmp_path
    )
    uids = set(_all_uids(ds))
    assert EMPTY_FINDINGS <= uids
    ex = next(e for split in ds for e in ds[split] if e["uid"] == "3")
    assert ex["report"].startswith("No displaced rib fractures") and ex["findings"] == ""
    # views=frontal: studies 14, 20, 42 have only a lateral here
    assert {
        s["uid"] for s in report["skipped"] if s["reason"] == "no frontal view" and s["filename"] is None
    } == {
        "14",
        "20",
        "42",
    }
    _assert_adds_up(ds, report)


def test_real_sample_absent_images_are_skipped(sample_dir, tmp_path):
    """Rows whose image files are absent (the full set's other views of these studies) land in `skipped`."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    os.symlink(sample_dir / "images" / "images_normalized", data / "images" / "images_normalized")
    (data / "indiana_reports.csv").write_bytes((sample_dir / "indiana_reports.csv").read_bytes())
    absent = ["14_IM-0256-1001.dcm.png", "20_IM-0653-1001.dcm.png", "42_IM-2063-1001.dcm.png"]
    rows = (sample_dir / "indiana_projections.csv").read_text().rstrip("\n").split("\n")
    rows += [f"{name.split('_')[0]},{name},Frontal" for name in absent]
    (data / "indiana_projections.csv").write_text("\n".join(rows) + "\n")
    ds, report = build_dataset(data, image_size=64, cache_dir=tmp_path / "cache")
    missing = {s["filename"] for s in report["skipped"] if s["reason"] == "image file missing"}
    assert missing == set(absent)
    assert {"14", "20", "42"} <= set(_all_uids(ds))  # their lateral views still make examples
    assert report["num_projection_rows"] == 16
    _assert_adds_up(ds, report)


# ------------------------------------------------------------------ splits


def test_r2gen_split_arithmetic():
    assert split_sizes(2955) == (2069, 296, 590)
    assert round(0.7 * 2955) == 2068  # why the builder rounds half up instead of using round()
    for n in (0, 1, 2, 3, 7, 10, 101, 3851):
        sizes = split_sizes(n)
        assert sum(sizes) == n and min(sizes) >= 0
    with pytest.raises(ValueError, match="summing to 1"):
        split_sizes(10, (0.5, 0.5, 0.5))


def test_assign_splits_deterministic_study_level():
    uids = [str(i) for i in range(1, 501)]
    a, b = assign_splits(uids, seed=1), assign_splits(list(reversed(uids)), seed=1)
    assert a == b  # input order does not matter
    assert assign_splits(uids, seed=2) != a
    counts = {name: sum(v == name for v in a.values()) for name in ("train", "validation", "test")}
    assert counts == {"train": 350, "validation": 50, "test": 100}


# ------------------------------------------------------------------ phantom-based builder tests


@pytest.fixture(scope="module")
def phantom_30(tmp_path_factory) -> Path:
    return synthesize(
        tmp_path_factory.mktemp("ph") / "data", num_studies=30, seed=5, image_size=96, num_proc=1
    )


def _copy_tree(src: Path, dst: Path) -> Path:
    (dst / "images" / "images_normalized").mkdir(parents=True)
    for name in ("indiana_reports.csv", "indiana_projections.csv"):
        (dst / name).write_bytes((src / name).read_bytes())
    for p in (src / "images" / "images_normalized").iterdir():
        (dst / "images" / "images_normalized" / p.name).write_bytes(p.read_bytes())
    return dst


def test_cache_reused_without_reencoding(phantom_30, tmp_path, monkeypatch):
    # num_proc=1: the calls are counted in this process
    calls = []
    real = images_module.encode_image

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(images_module, "encode_image", counting)
    data = _copy_tree(phantom_30, tmp_path / "data")
    kw = {"cache_dir": tmp_path / "cache", "num_proc": 1}
    ds1, rep1 = build_dataset(data, tmp_path / "out1", image_size=64, **kw)
    assert len(calls) == 60 and not rep1["reused_cache"] and rep1["num_images_encoded_this_run"] == 60
    calls.clear()
    ds2, rep2 = build_dataset(data, tmp_path / "out2", image_size=64, **kw)
    assert calls == [] and rep2["reused_cache"] and rep2["num_images_encoded_this_run"] == 0
    assert rep2["num_examples"] == rep1["num_examples"] and rep2["skipped"] == rep1["skipped"]
    assert ds2["train"]["uid"] == ds1["train"]["uid"]
    assert ds2["train"][0]["images"][0].tobytes() == ds1["train"][0]["images"][0].tobytes()
    assert json.loads((tmp_path / "out2" / "build_report.json").read_text())["reused_cache"] is True
    # another option -> another cache entry
    build_dataset(data, image_size=48, **kw)
    assert len(calls) == 60
    calls.clear()
    # a changed input file (new bytes, new mtime) -> rebuilt
    victim = next((data / "images" / "images_normalized").iterdir())
    Image.new("L", (80, 80), 128).save(victim)
    _, rep3 = build_dataset(data, image_size=64, **kw)
    assert len(calls) == 60 and not rep3["reused_cache"]
    calls.clear()
    # force_rebuild ignores the cache
    build_dataset(data, image_size=64, force_rebuild=True, **kw)
    assert len(calls) == 60


def test_saved_folder_with_an_empty_split_loads_back(tmp_path):
    """Two studies leave the validation split empty; the saved folder still loads, with every split's features."""
    data = synthesize(tmp_path / "data", num_studies=2, seed=0, image_size=64, num_proc=1)
    ds, report = build_dataset(data, tmp_path / "out", image_size=64, cache_dir=tmp_path / "cache")
    assert report["num_examples"] == {"train": 1, "validation": 0, "test": 1}
    reloaded = datasets.load_from_disk(str(tmp_path / "out"))
    assert {name: split.num_rows for name, split in reloaded.items()} == report["num_examples"]
    assert reloaded["validation"].features == reloaded["train"].features == ds["train"].features


def test_saving_copies_the_built_files_and_keeps_a_selection_exact(phantom_30, tmp_path):
    """The saved splits are the built ones row for row; a split narrowed with `select` saves only its rows."""
    from xraycap.dataset_builder.saving import save_dataset_dict

    ds, report = build_dataset(phantom_30, tmp_path / "out", image_size=64, cache_dir=tmp_path / "cache")
    reloaded = datasets.load_from_disk(str(tmp_path / "out"))
    for name, split in ds.items():
        assert reloaded[name]["uid"] == split["uid"] and reloaded[name]["images"] == split["images"], name
    save_dataset_dict(datasets.DatasetDict({"train": ds["train"].select([2, 0])}), tmp_path / "narrow", "x")
    assert datasets.load_from_disk(str(tmp_path / "narrow"))["train"]["uid"] == [
        ds["train"]["uid"][i] for i in (2, 0)
    ]


def test_r2gen_option_and_views_all(phantom_30, tmp_path):
    ds, report = build_dataset(phantom_30, r2gen=True, views="all", image_size=64, cache_dir=tmp_path)
    assert report["options"]["min_images"] == 2 and report["options"]["section"] == "findings"
    assert report["num_examples"] == {"train": 21, "validation": 3, "test": 6}
    with pytest.raises(ValueError, match="findings-only"):
        build_dataset(phantom_30, r2gen=True, section="impression", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="views must be one of"):
        build_dataset(phantom_30, views="both", cache_dir=tmp_path)


def test_section_findings_plus_impression_and_xxxx(phantom_30, tmp_path):
    ds, _ = build_dataset(
        phantom_30, section="findings+impression", xxxx="marker", image_size=64, cache_dir=tmp_path
    )
    ex = ds["train"][0]
    assert ex["report"].startswith(clean_text(ex["findings"], "marker")) and ex["report"].endswith(
        clean_text(ex["impression"], "marker")
    )
    assert not any("XXXX" in r for r in ds["train"]["report"])
    assert any("XXXX" in f for f in ds["train"]["findings"])  # raw columns are kept: reversible
    assert any(XXXX_MARKER in r for split in ds for r in ds[split]["report"])


def test_split_file_r2gen_annotation(phantom_30, tmp_path):
    rows = list(csv.DictReader(open(phantom_30 / "indiana_projections.csv")))
    series = {r["uid"]: r["filename"].split("_")[1].rsplit("-", 1)[0] for r in rows}  # uid -> "IM-1004"
    ann = {
        "train": [
            {"id": f"CXR{u}_{series[u]}", "image_path": [], "report": "", "split": "train"}
            for u in "1 2 3 4".split()
        ],
        "val": [
            {"id": f"CXR5_{series['5']}", "split": "val"},
            {"id": "CXR6_IM-9999", "split": "val"},
        ],  # 6: number only
        "test": [{"id": f"CXR7_{series['7']}", "split": "test"}, {"id": "CXR99999_IM-8888", "split": "test"}],
    }
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(ann))
    ds, report = build_dataset(phantom_30, split_file=path, image_size=64, cache_dir=tmp_path / "c")
    assert sorted(ds["train"]["uid"], key=int) == ["1", "2", "3", "4"]
    assert sorted(ds["validation"]["uid"], key=int) == ["5", "6"] and ds["test"]["uid"] == ["7"]
    assert report["split_file"]["unmatched_ids"] == ["CXR99999_IM-8888"]
    assert report["split_file"]["matched_by"] == {"exact": 6, "number_only": 1, "series_only": 0}
    assert report["skipped_by_reason"]["not in split file"] == 23 * 3  # 23 studies, each 1 study + 2 rows
    _assert_adds_up(ds, report)
    assert parse_r2gen_id("CXR2384_IM-0942") == ("2384", "IM-0942")
    assert parse_r2gen_id("CXR0012_IM-0001") == ("12", "IM-0001")
    assert parse_r2gen_id("garbage") is None
    ann["test"].append({"id": "CXR1_IM-0000", "split": "test"})  # uid 1 already in train
    path.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match="already in split"):
        build_dataset(phantom_30, split_file=path, image_size=64, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------ text cleaning


def test_clean_text_options():
    raw = "  The  heart is\n normal. .  No XXXX  effusion..   XXXX-year-old. "
    assert clean_text(raw) == "The heart is normal. No XXXX effusion. XXXX-year-old."
    assert (
        clean_text(raw, "marker")
        == f"The heart is normal. No {XXXX_MARKER} effusion. {XXXX_MARKER}-year-old."
    )
    assert clean_text(raw, "drop") == "The heart is normal. No effusion. year-old."
    assert clean_text(None) == "" and clean_text("   ") == "" and clean_text(" . . ") == "."
    with pytest.raises(ValueError, match="xxxx must be one of"):
        clean_text("x", "mask")


# ------------------------------------------------------------------ CLI and download


def test_cli_build_prints_summary(phantom_30, tmp_path, capsys):
    rc = cli_main(
        ["build", "--data_dir", str(phantom_30), "--output_dir", str(tmp_path / "o"), "--image_size", "64"]
        + ["--cache_dir", str(tmp_path / "c"), "--views", "frontal"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "train" in out and "21 studies" in out and "validation" in out and "test" in out
    assert "30  view not selected" in out and "adds up" in out
    assert json.loads((tmp_path / "o" / "build_report.json").read_text())["num_examples"]["test"] == 6


def test_cli_synthesize(tmp_path, capsys):
    rc = cli_main(
        ["synthesize", "--output_dir", str(tmp_path / "s"), "--num_studies", "3", "--image_size", "64"]
    )
    assert rc == 0 and len(list((tmp_path / "s" / "images" / "images_normalized").iterdir())) == 6


def test_download_offline_error_names_data_dir(monkeypatch, tmp_path, capsys):
    import kagglehub

    seen = {}

    def fail(handle, **kwargs):
        seen["handle"] = handle
        raise OSError("Failed to resolve 'www.kaggle.com' (no network)")

    monkeypatch.setattr(kagglehub, "dataset_download", fail)
    with pytest.raises(ConnectionError, match="--data_dir") as info:
        download(tmp_path / "dl")
    assert seen["handle"] == KAGGLE_HANDLE == "raddar/chest-xrays-indiana-university/versions/2"
    assert "synthesize" in str(info.value)
    assert cli_main(["download", "--output_dir", str(tmp_path / "dl")]) == 2
    assert "--data_dir" in capsys.readouterr().err


def test_download_finds_nested_root(monkeypatch, tmp_path):
    import kagglehub

    root = tmp_path / "cache" / "versions" / "2"
    root.mkdir(parents=True)
    (root / "indiana_reports.csv").write_text("uid\n")
    (root / "indiana_projections.csv").write_text("uid\n")
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, **kw: str(tmp_path / "cache"))
    assert download() == root


# ------------------------------------------------------------------ the 409 real reports (text only)


def _reports_sample_with(tmp_path: Path, shared_data: Path, placeholders: bool) -> Path:
    src = shared_data / "iu_xray_reports_sample"
    data = tmp_path / "data"
    images = data / "images" / "images_normalized"
    images.mkdir(parents=True)
    for name in ("indiana_reports.csv", "indiana_projections.csv"):
        (data / name).write_bytes((src / name).read_bytes())
    if placeholders:
        png = tmp_path / "p.png"
        Image.new("L", (40, 32), 90).save(png)
        for row in csv.DictReader(open(src / "indiana_projections.csv")):
            os.link(png, images / row["filename"])
    return data


def test_real_reports_without_images_all_accounted(shared_data, tmp_path):
    data = _reports_sample_with(tmp_path, shared_data, placeholders=False)
    ds, report = build_dataset(data, cache_dir=tmp_path / "c")
    assert report["num_reports"] == 409 and report["num_projection_rows"] == 807
    assert report["num_examples"] == {"train": 0, "validation": 0, "test": 0}
    assert report["skipped_by_reason"] == {
        "image file missing": 807,
        "too few usable images": 360,
        "empty target section": 49,
    }
    _assert_adds_up(ds, report)


def test_real_reports_r2gen_population_with_placeholders(shared_data, tmp_path):
    data = _reports_sample_with(tmp_path, shared_data, placeholders=True)
    ds, report = build_dataset(data, r2gen=True, image_size=32, cache_dir=tmp_path / "c")
    # 331 of these 409 real studies have findings and >= 2 images
    assert report["num_examples"] == dict(zip(("train", "validation", "test"), split_sizes(331)))
    assert "XXXX" in " ".join(ds["train"]["report"])  # the default keeps the anonymisation tokens
    assert all(r == " ".join(r.split()) and ". ." not in r and ".." not in r for r in ds["train"]["report"])
    _assert_adds_up(ds, report)


def test_builder_class_used_directly(phantom_30, tmp_path):
    """The GeneratorBasedBuilder works on its own, as a `datasets` user would drive it."""
    from xraycap.dataset_builder import IndianaXrayBuilder

    builder = IndianaXrayBuilder(
        data_dir=str(phantom_30), cache_dir=str(tmp_path), image_size=64, views="frontal"
    )
    builder.download_and_prepare()
    ds = builder.as_dataset()
    assert {k: v.num_rows for k, v in ds.items()} == {"train": 21, "validation": 3, "test": 6}
    assert ds["train"].features["images"].feature.__class__.__name__ == "Image"
    assert all(len(p) == 1 for p in ds["train"]["projections"])


def test_python_dash_m_entry_point(repo_root):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "dataset_builder", "--help"], capture_output=True, text=True, cwd=repo_root
    )
    assert proc.returncode == 0
    assert all(cmd in proc.stdout for cmd in ("synthesize", "build", "download"))
