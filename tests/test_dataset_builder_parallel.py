"""The build at scale: sharded across processes with exact accounting, JPEGs decoded once at the target size,
a fingerprint that does not stat every image, and an output folder that does not store the images twice."""

import io
import os
import pathlib
import pickle
import shutil
import time

import datasets
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from xraycap.dataset_builder import build_dataset
from xraycap.dataset_builder import images as img
from xraycap.dataset_builder.builder import fingerprint_inputs
from xraycap.dataset_builder.configuration import ChestXrayConfig
from xraycap.dataset_builder.mimic_cxr import METADATA_CSV, image_relpath, make_plan, report_relpath
from xraycap.dataset_builder.study_encoding import plan_in_shards
from xraycap.dataset_builder.synthesize_mimic import dicom_id_of, ids_of, synthesize_mimic

NUM_STUDIES = 48


@pytest.fixture(scope="module")
def damaged_mimic(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """Phantom MIMIC-CXR studies with a truncated JPEG, two non-image JPEGs (one study), a missing report."""
    root = synthesize_mimic(
        tmp_path_factory.mktemp("mimic") / "data", NUM_STUDIES, seed=3, image_size=96, num_proc=1
    )

    def image(index: int, k: int) -> pathlib.Path:
        study, subject, _ = ids_of(index)
        return root / image_relpath(subject, study, dicom_id_of(3, index, k))

    truncated = image(4, 0)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for k in (0, 1):
        image(10, k).write_text("not a jpeg")
    study, subject, _ = ids_of(20)
    (root / report_relpath(subject, study)).unlink()
    return root, {
        "truncated": (ids_of(4)[0], truncated),
        "garbage": ids_of(10)[0],
        "no_report": ids_of(20)[0],
    }


def _build(data: pathlib.Path, tmp: pathlib.Path, num_proc: int):
    return build_dataset(
        data,
        tmp / f"out{num_proc}",
        data_format="mimic-cxr",
        image_size=48,
        cache_dir=tmp / f"cache{num_proc}",
        num_proc=num_proc,
    )


def test_sharded_build_is_row_for_row_the_serial_one_with_exact_accounting(damaged_mimic, tmp_path):
    data, damage = damaged_mimic
    serial, serial_report = _build(data, tmp_path, 1)
    sharded, sharded_report = _build(data, tmp_path, 2)
    assert sharded_report["num_proc"] == 2
    for name in serial:
        assert sharded[name].data.table.equals(serial[name].data.table), name
    assert sharded_report["skipped"] == serial_report["skipped"]
    assert sharded_report["num_images_encoded_this_run"] == serial_report["num_images_encoded_this_run"]

    for report in (serial_report, sharded_report):
        reasons = {(s["uid"], s["filename"]): s["reason"] for s in report["skipped"]}
        truncated_study, truncated_path = damage["truncated"]
        truncated_name = truncated_path.relative_to(data).as_posix()
        assert reasons[(truncated_study, truncated_name)] == img.REASON_UNREADABLE
        assert reasons[(damage["garbage"], None)] == "too few usable images"
        assert (
            sum(r == img.REASON_NOT_IMAGE for (uid, _), r in reasons.items() if uid == damage["garbage"]) == 2
        )
        assert reasons[(damage["no_report"], None)] == "report file missing"
        assert (
            len(report["skipped"]) == 1 + 3 + 3
        )  # truncated image; garbage study + 2 rows; no report + 2 rows
        assert report["num_reports"] == NUM_STUDIES and report["num_projection_rows"] == 2 * NUM_STUDIES
        assert sum(report["num_examples"].values()) == NUM_STUDIES - 2
        assert sum(report["num_images"].values()) == 2 * NUM_STUDIES - 5
        assert report["num_images_encoded_this_run"] == 2 * NUM_STUDIES - 5
        assert report["accounting"]["adds_up"]
    example = next(e for e in serial["train"] if e["uid"] == damage["truncated"][0])
    assert example["projections"] == ["Lateral"]  # the frontal left out, the lateral kept


def _smooth_jpeg(path: pathlib.Path, size=(2400, 3000)) -> None:
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    pixels = 128 + 60 * np.sin(xx / 170) * np.cos(yy / 230) + 40 * (yy / size[1])
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, format="JPEG", quality=92)


def test_jpeg_is_opened_once_and_decoded_at_the_target_size(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    _smooth_jpeg(path)
    opens, drafts = [], []
    real_open, real_draft = Image.open, JpegImagePlugin.JpegImageFile.draft

    def counting_open(*args, **kwargs):
        opens.append(args[0])
        return real_open(*args, **kwargs)

    def recording_draft(self, mode, size, *args, **kwargs):
        drafts.append((mode, size))
        return real_draft(self, mode, size, *args, **kwargs)

    monkeypatch.setattr(img.Image, "open", counting_open)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    data, original = img.encode_image(path, image_size=256)
    assert len(opens) == 1 and original == (2400, 3000)
    assert drafts == [("L", (205, 256))]
    monkeypatch.undo()

    # what a full-resolution decode gives: the same size, nearly the same pixels
    with Image.open(path) as im:
        full = im.convert("L").resize((205, 256), Image.BICUBIC, reducing_gap=3.0)
    with Image.open(io.BytesIO(data)) as out:
        assert out.size == full.size and out.mode == "L"
        diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(full, dtype=np.int16))
    assert diff.mean() < 1.5 and diff.max() < 24


def test_fingerprint_stats_no_image_and_changes_with_the_tables(damaged_mimic, tmp_path, monkeypatch):
    data = pathlib.Path(shutil.copytree(damaged_mimic[0], tmp_path / "data"))
    cfg = ChestXrayConfig(name="default", data_format="mimic-cxr")
    stat_calls = []
    real_stat = pathlib.Path.stat

    def recording_stat(self, *args, **kwargs):
        stat_calls.append(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", recording_stat)
    first = fingerprint_inputs(data, cfg, {})
    assert not [p for p in stat_calls if p.suffix == ".jpg"]  # images: their names, from the listing
    monkeypatch.undo()
    assert fingerprint_inputs(data, cfg, {}) == first

    metadata = data / METADATA_CSV
    original = metadata.read_bytes()
    import gzip

    text = gzip.decompress(original).decode().replace(",LATERAL,", ",LL,", 1)
    metadata.write_bytes(gzip.compress(text.encode()))
    assert fingerprint_inputs(data, cfg, {}) != first  # a table changed
    metadata.write_bytes(original)
    assert fingerprint_inputs(data, cfg, {}) == first
    extra = next(data.glob("files/p1*/p*/s*/*.jpg")).with_name("extra.jpg")
    extra.write_bytes(b"x")
    assert fingerprint_inputs(data, cfg, {}) != first  # a file appeared


def test_output_folder_links_the_cache_instead_of_copying(damaged_mimic, tmp_path):
    _, report = _build(damaged_mimic[0], tmp_path, 2)
    arrow = sorted((tmp_path / "out2").rglob("*.arrow"))
    assert arrow and all(os.stat(f).st_nlink == 2 for f in arrow)
    cached = {os.stat(f).st_ino for f in (tmp_path / "cache2").rglob("*.arrow")}
    assert {os.stat(f).st_ino for f in arrow} <= cached  # the same files: the images are on disk once
    reloaded = datasets.load_from_disk(str(tmp_path / "out2"))
    assert {name: split.num_rows for name, split in reloaded.items()} == report["num_examples"]


def test_what_the_workers_are_sent_per_study_does_not_grow_with_the_reports(tmp_path):
    # the plan the main process holds (and pickles into every shard) is ids and file names: a long report
    # costs it nothing, the worker reads the report file itself; the dataset still carries the full text
    root = synthesize_mimic(tmp_path / "data", 16, seed=5, image_size=64, num_proc=1)
    findings = "The lungs are clear without focal consolidation. " * 400  # ~20 KB a report
    for report in root.glob("files/p1*/p*/s*.txt"):
        report.write_text(f"FINAL REPORT\n FINDINGS: {findings}\n IMPRESSION: No acute process.\n")
    cfg = ChestXrayConfig(name="default", data_format="mimic-cxr", data_dir=str(root))
    shards, _, _ = plan_in_shards(make_plan, cfg, root)
    num_studies = sum(shard.num_studies for split in shards.values() for shard in split)
    assert num_studies == 16
    assert len(pickle.dumps(shards)) / num_studies < 1024
    ds, _ = _build(root, tmp_path, 2)
    assert {row["findings"] for row in ds["train"]} | {row["findings"] for row in ds["test"]} == {
        findings.strip()
    }


def test_workers_start_once_and_share_every_split_when_some_studies_are_slow(
    damaged_mimic, tmp_path, monkeypatch
):
    # the first half of train's studies are slow to encode: a worker that gets them must not be left with all of
    # them while the other one idles, and the small splits must not wait for a new set of workers
    from xraycap.dataset_builder import builder as builder_module
    from xraycap.dataset_builder import study_encoding

    data = damaged_mimic[0]
    studies, _, _ = make_plan(
        ChestXrayConfig(name="default", data_format="mimic-cxr", data_dir=str(data)), data
    )
    train = [s.uid for s in studies if s.split == "train"]
    slow = set(train[: len(train) // 2])
    log = tmp_path / "encoded.txt"
    real_encode_study = builder_module.encode_study

    def recording_encode_study(study, *args, **kwargs):
        if study.uid in slow:
            time.sleep(0.05)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {study.split} {study.uid}\n")
        return real_encode_study(study, *args, **kwargs)

    monkeypatch.setattr(builder_module, "encode_study", recording_encode_study)  # the workers are forked
    monkeypatch.setattr(study_encoding, "SHARD_STUDIES", 2)
    sharded, _ = _build(data, tmp_path, 2)
    monkeypatch.undo()
    serial, _ = _build(data, tmp_path, 1)

    encoded = [line.split() for line in log.read_text().splitlines()]
    assert sorted(uid for _, _, uid in encoded) == sorted(s.uid for s in studies)  # each study encoded once
    workers = {pid for pid, _, _ in encoded}
    assert len(workers) == 2 and str(os.getpid()) not in workers  # two processes, started once for all splits
    assert {pid for pid, _, uid in encoded if uid in slow} == workers  # the slow studies are shared
    for name in serial:
        assert sharded[name].data.table.equals(serial[name].data.table), name


def test_a_failing_worker_stops_the_sharded_build_with_its_error_and_leaves_no_process(
    damaged_mimic, tmp_path, monkeypatch
):
    import psutil
    from xraycap.dataset_builder import builder as builder_module

    real_encode_study = builder_module.encode_study
    failing = damaged_mimic[1]["truncated"][0]

    def encode_study(study, *args, **kwargs):
        if study.uid == failing:
            raise ValueError(f"report of study {study.uid} changed while the dataset was built")
        return real_encode_study(study, *args, **kwargs)

    monkeypatch.setattr(builder_module, "encode_study", encode_study)
    before = {
        child.pid for child in psutil.Process().children(recursive=True)
    }  # e.g. an earlier test's METEOR
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as raised:  # as in a serial build
        _build(damaged_mimic[0], tmp_path, 2)
    assert f"study {failing} changed" in str(raised.value.__cause__)
    assert not {child.pid for child in psutil.Process().children(recursive=True)} - before
    assert not (tmp_path / "out2").exists()
