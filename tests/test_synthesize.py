"""Phantom studies: deterministic, findings visible, reports agree with the MeSH column, round trip."""

import csv
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from xraycap.dataset_builder import build_dataset, synthesize
from xraycap.dataset_builder.phantom_drawing import draw_frontal, sample_anatomy
from xraycap.dataset_builder.phantom_findings import Finding

# ------------------------------------------------------------------ an independent report checker


def parse_mesh(mesh: str) -> set[tuple]:
    """Kaggle-style MeSH column -> {(kind, side, detail)}."""
    if mesh == "normal":
        return set()
    out = set()
    for term in mesh.split(";"):
        parts = term.split("/")
        head = parts[0]
        if head == "Cardiomegaly":
            out.add(("cardiomegaly", None, parts[1]))
        elif head == "Pleural Effusion":
            out.add(("effusion", parts[1], None))
        elif head == "Pneumothorax":
            out.add(("pneumothorax", parts[1], None))
        elif head == "Consolidation":
            out.add(("consolidation", parts[3], parts[2].split()[0]))
        elif head == "Nodule":
            out.add(("nodule", parts[3], parts[2]))
        else:
            raise AssertionError(f"unexpected MeSH term {term!r}")
    return out


_SEV = {"mildly": "mild", "moderately": "moderate", "severely": "severe"}


def parse_findings_text(text: str) -> set[tuple]:
    """Reads a phantom findings section back into {(kind, side, detail)} with plain regexes."""
    t = text.lower()
    out = set()
    for m in re.finditer(r"\b(mildly|moderately|severely) enlarged|\b(mild|moderate|severe) cardiomegaly", t):
        out.add(("cardiomegaly", None, _SEV.get(m.group(1), m.group(1)) if m.group(1) else m.group(2)))
    for m in re.finditer(r"\b(right|left) pleural effusion", t):
        out.add(("effusion", m.group(1), None))
    if re.search(r"\bbilateral pleural effusions", t):
        out.add(("effusion", "bilateral", None))
    for m in re.finditer(r"\b(right|left)(?:-sided)? (?:apical )?pneumothorax", t):
        out.add(("pneumothorax", m.group(1), None))
    for sentence in t.split("."):
        if "consolidation" in sentence and not sentence.strip().startswith(("no ", "there is no")):
            for m in re.finditer(r"\b(right|left) (upper|middle|lower) lobe", sentence):
                out.add(("consolidation", m.group(1), m.group(2)))
        if "nodule" in sentence:
            for m in re.finditer(r"\b(right|left) (upper|mid|lower) lung", sentence):
                out.add(("nodule", m.group(1), m.group(2)))
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def phantom_200(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("phantom") / "data", num_studies=200, seed=3)


# ------------------------------------------------------------------ tests


def test_layout_and_columns(phantom_200):
    reports = _read_csv(phantom_200 / "indiana_reports.csv")
    projections = _read_csv(phantom_200 / "indiana_projections.csv")
    assert list(reports[0]) == [
        "uid",
        "MeSH",
        "Problems",
        "image",
        "indication",
        "comparison",
        "findings",
        "impression",
    ]
    assert list(projections[0]) == ["uid", "filename", "projection"]
    assert len(reports) == 200 and len(projections) == 400
    assert Counter(r["projection"] for r in projections) == {"Frontal": 200, "Lateral": 200}
    for row in projections[:6]:
        im = Image.open(phantom_200 / "images" / "images_normalized" / row["filename"])
        assert im.mode == "L" and im.size == (256, 256) and im.format == "PNG"


def test_every_report_agrees_with_mesh(phantom_200):
    reports = _read_csv(phantom_200 / "indiana_reports.csv")
    for row in reports:
        truth = parse_mesh(row["MeSH"])
        assert parse_findings_text(row["findings"]) == truth, (row["uid"], row["MeSH"], row["findings"])
        problems = set(row["Problems"].split(";"))
        assert problems == ({"normal"} if not truth else {t.split("/")[0] for t in row["MeSH"].split(";")})
        kinds = {k for k, _, _ in truth}
        text = row["findings"].lower()
        if not kinds & {"effusion", "pneumothorax"}:
            assert re.search(r"no (pneumothorax|pleural effusion)", text), row["findings"]
        if "cardiomegaly" not in kinds:
            assert "enlarged" not in text and "cardiomegaly" not in text
        if not truth:
            assert "no acute cardiopulmonary abnormality" in row["impression"].lower()
        else:
            assert "no acute" not in row["impression"].lower()


def test_class_mix_and_variety(phantom_200):
    reports = _read_csv(phantom_200 / "indiana_reports.csv")
    n_findings = Counter(len(parse_mesh(r["MeSH"])) for r in reports)
    assert 0.2 <= n_findings[0] / 200 <= 0.4  # ~30% normal
    assert n_findings[1] > 0 and n_findings[2] > 0 and set(n_findings) <= {0, 1, 2}
    kinds = Counter(k for r in reports for k, _, _ in parse_mesh(r["MeSH"]))
    assert all(
        kinds[k] >= 15 for k in ("cardiomegaly", "effusion", "pneumothorax", "consolidation", "nodule")
    )
    assert len({r["findings"] for r in reports}) > 150  # paraphrase variety
    assert sum("XXXX" in r["findings"] for r in reports) >= 10  # anonymisation tokens like the real data
    sides = Counter(s for r in reports for k, s, _ in parse_mesh(r["MeSH"]) if k == "effusion")
    assert {"left", "right", "bilateral"} <= set(sides)


def test_same_seed_byte_identical_and_independent_of_workers(tmp_path):
    a = synthesize(tmp_path / "a", num_studies=12, seed=7, num_proc=1)
    b = synthesize(tmp_path / "b", num_studies=12, seed=7, num_proc=2)
    c = synthesize(tmp_path / "c", num_studies=12, seed=8, num_proc=1)
    assert _tree_digest(a) == _tree_digest(b)
    assert len(_tree_digest(a)) == 3 + 24  # two CSVs, phantom_settings.json, 24 PNGs
    assert _tree_digest(a) != _tree_digest(c)


def _lung_mean(im: Image.Image, side: str, y0: float, y1: float) -> float:
    arr = np.asarray(im.resize((128, 128), Image.BILINEAR), dtype=np.float32)
    x = slice(20, 56) if side == "right" else slice(72, 108)  # patient's right = image left
    return float(arr[int(y0 * 128) : int(y1 * 128), x].mean())


def test_findings_visible_at_128px():
    """A drawn finding changes the image where it should, strongly enough to see at 128 px."""

    def draw(findings):
        # the same anatomy draws (the heart size follows a cardiomegaly finding) and the same noise
        anatomy = sample_anatomy(np.random.default_rng(0), findings)
        return draw_frontal(findings, anatomy, np.random.default_rng(1), 256)

    normal = draw([])
    eff = draw([Finding("effusion", side="right")])
    # basal right lung much brighter, left unchanged
    assert _lung_mean(eff, "right", 0.55, 0.68) - _lung_mean(normal, "right", 0.55, 0.68) > 40
    assert abs(_lung_mean(eff, "left", 0.55, 0.68) - _lung_mean(normal, "left", 0.55, 0.68)) < 5
    ptx = draw([Finding("pneumothorax", side="left")])
    arr_n = np.asarray(normal.resize((128, 128)), dtype=np.float32)
    arr_p = np.asarray(ptx.resize((128, 128)), dtype=np.float32)
    # a dark rim: the lateral/apical left lung gets darker and loses texture
    rim = (slice(22, 60), slice(95, 108))
    assert arr_p[rim].mean() < arr_n[rim].mean() - 8
    card = draw([Finding("cardiomegaly", severity="moderate")])
    row = int(0.62 * 128)
    bright_n = (np.asarray(normal.resize((128, 128)), dtype=np.float32)[row] > 110).sum()
    bright_c = (np.asarray(card.resize((128, 128)), dtype=np.float32)[row] > 110).sum()
    assert bright_c - bright_n >= 12  # the heart is at least 12 px wider at 128 px
    nod = draw([Finding("nodule", side="right", location="upper")])
    diff = np.abs(np.asarray(nod, np.float32) - np.asarray(normal, np.float32))
    assert diff.max() > 60 and (diff > 40).sum() > 150


def test_round_trip_build_200(phantom_200, tmp_path):
    ds, report = build_dataset(phantom_200, tmp_path / "out", image_size=128, cache_dir=tmp_path / "cache")
    assert report["skipped"] == [] and report["accounting"]["adds_up"]
    assert report["num_examples"] == {"train": 140, "validation": 20, "test": 40}
    reports = {r["uid"]: r for r in _read_csv(phantom_200 / "indiana_reports.csv")}
    ex = ds["test"][0]
    assert ex["mesh"] == reports[ex["uid"]]["MeSH"] and ex["report"] == reports[ex["uid"]]["findings"]
    assert [im.size for im in ex["images"]] == [(128, 128), (128, 128)]
    assert ex["projections"] == ["Frontal", "Lateral"]
    assert (tmp_path / "out" / "build_report.json").is_file()


def test_phantom_reports_read_right_by_the_labeler(phantom_200, repo_root):
    """Cross-check with the metrics engineer's CheXpert-style labeler, when it has landed."""
    if not (repo_root / "metrics" / "radiology_report" / "labeler.py").is_file():
        pytest.skip("metrics/radiology_report/labeler.py not present yet")
    labeler = pytest.importorskip("xraycap.radiology_report.labeler")
    reports = _read_csv(phantom_200 / "indiana_reports.csv")
    texts = [r["findings"] for r in reports] + [r["impression"] for r in reports]
    labels = labeler.label_reports(texts)
    wrong = []
    for row, lab, text in zip(reports + reports, labels, texts):
        kinds = {k for k, _, _ in parse_mesh(row["MeSH"])}
        expect = {
            "Cardiomegaly": "cardiomegaly" in kinds,
            "Pleural Effusion": "effusion" in kinds,
            "Pneumothorax": "pneumothorax" in kinds,
            "Lung Lesion": "nodule" in kinds,
            # CheXpert's no_finding.txt: "degenerative changes" of the spine are a finding too.
            "No Finding": not kinds and "degenera" not in text.lower(),
        }
        for name, positive in expect.items():
            if (lab.get(name) == 1) != positive:
                wrong.append((row["uid"], name, lab.get(name), row["findings"]))
        if "consolidation" in kinds and not (lab.get("Consolidation") == 1 or lab.get("Lung Opacity") == 1):
            wrong.append((row["uid"], "Consolidation", lab.get("Consolidation"), row["findings"]))
    assert not wrong, wrong[:5]
