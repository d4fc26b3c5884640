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
from xraycap.dataset_builder.phantom_drawing import draw_frontal, draw_lateral, sample_anatomy
from xraycap.dataset_builder.phantom_findings import (
    CHEXPERT_OBSERVATION,
    FINDING_KINDS,
    Finding,
    sample_findings,
)
from xraycap.dataset_builder.phantom_report import write_report
from xraycap.dataset_builder.splits import assign_splits
from xraycap.dataset_builder.study_plan import finding_set_novelty

# ------------------------------------------------------------------ an independent report checker


def parse_mesh(mesh: str) -> set[tuple]:
    """Kaggle-style MeSH column -> {(kind, side, detail)} (detail: severity, size, lobe, zone or device)."""
    if mesh == "normal":
        return set()
    out = set()
    for term in mesh.split(";"):
        parts = term.split("/")
        head = parts[0]
        if head == "Cardiomegaly":
            out.add(("cardiomegaly", None, parts[1]))
        elif head == "Mediastinum":
            out.add(("mediastinum", None, parts[2]))
        elif head == "Pleural Effusion":
            out.add(("effusion", parts[1], parts[2]))
        elif head == "Pneumothorax":
            out.add(("pneumothorax", parts[1], parts[2]))
        elif head == "Consolidation":
            out.add(("consolidation", parts[3], parts[2].split()[0]))
        elif head == "Nodule":
            out.add(("nodule", parts[3], parts[2]))
        elif head == "Opacity":
            out.add(("opacity", parts[3], parts[2]))
        elif head == "Pleural Thickening":
            out.add(("pleural", parts[1], parts[2]))
        elif head == "Pulmonary Atelectasis":
            out.add(("atelectasis", parts[3], parts[2]))
        elif head == "Pulmonary Edema":
            out.add(("edema", None, parts[2]))
        elif head == "Fractures, Bone":
            out.add(("fracture", parts[3], {"upper": "4th", "mid": "6th", "lower": "8th"}[parts[2]]))
        elif head == "Pacemaker, Artificial":
            out.add(("device", parts[1], "pacemaker"))
        elif head == "Catheters, Indwelling":
            out.add(("device", parts[1], "catheter"))
        elif head == "Tube, Inserted":
            out.add(("device", None, "endotracheal tube"))
        else:
            raise AssertionError(f"unexpected MeSH term {term!r}")
    return out


_S = r"(right|left)"


def parse_findings_text(text: str) -> set[tuple]:
    """Reads a phantom findings section back into {(kind, side, detail)} with plain regexes, sentence by
    sentence (a sentence that negates is skipped)."""
    out = set()
    for sentence in re.split(r"(?<=\.) ", text.lower()):
        if sentence.startswith(("no ", "there is no ")):
            continue
        if m := re.search(r"\b(mild|moderate|severe)(?:ly)? (?:enlarged|cardiomegaly)", sentence):
            out.add(("cardiomegaly", None, m.group(1)))
        if "mediastin" in sentence and "widen" in sentence:
            out.add(("mediastinum", None, re.search(r"\b(mild|marked)", sentence).group(1)))
        for m in re.finditer(rf"(small|moderate|large) {_S} pleural effusion", sentence):
            out.add(("effusion", m.group(2), m.group(1)))
        if m := re.search(r"(small|moderate|large)(?: bilateral)? pleural effusions", sentence):
            out.add(("effusion", "bilateral", m.group(1)))
        if m := re.search(rf"(small|large) {_S}(?:-sided)? pneumothorax", sentence):
            out.add(("pneumothorax", m.group(2), m.group(1)))
        if "consolidation" in sentence:
            for m in re.finditer(rf"\b{_S} (upper|middle|lower) lobe", sentence):
                out.add(("consolidation", m.group(1), m.group(2)))
        if "nodule" in sentence:
            for m in re.finditer(rf"\b{_S} (upper|mid|lower) lung", sentence):
                out.add(("nodule", m.group(1), m.group(2)))
        if "opacity" in sentence:
            for m in re.finditer(rf"\b{_S} (upper|mid|lower) lung", sentence):
                out.add(("opacity", m.group(1), m.group(2)))
        if "pleural thickening" in sentence:
            m = re.search(rf"\b{_S} (apical|lateral|pleural)", sentence)
            out.add(("pleural", m.group(1), "apical" if "apical" in sentence else "lateral"))
        if "atelectasis" in sentence:
            m = re.search(rf"\b{_S} (midlung|lung base)", sentence)
            out.add(("atelectasis", m.group(1), "mid" if m.group(2) == "midlung" else "lower"))
        if "edema" in sentence:
            out.add(("edema", None, re.search(r"\b(mild|moderate)", sentence).group(1)))
        if "fracture" in sentence:
            m = re.search(rf"\b{_S} (?:lateral )?(4th|6th|8th) rib", sentence)
            out.add(("fracture", m.group(1), m.group(2)))
        if "pacemaker" in sentence:
            out.add(("device", re.search(rf"\b{_S}", sentence).group(1), "pacemaker"))
        if "catheter" in sentence:
            out.add(("device", re.search(rf"\b{_S}", sentence).group(1), "catheter"))
        if "endotracheal tube" in sentence:
            out.add(("device", None, "endotracheal tube"))
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
        if "fracture" not in kinds:
            assert not re.search(r"(?<!no displaced rib )fracture", text), row["findings"]
        if kinds <= {"device"}:  # nothing but devices: a normal study
            assert "no acute cardiopulmonary abnormality" in row["impression"].lower()
        else:
            assert "no acute" not in row["impression"].lower()


def test_class_mix_and_variety(phantom_200):
    reports = _read_csv(phantom_200 / "indiana_reports.csv")
    n_findings = Counter(len(parse_mesh(r["MeSH"])) for r in reports)
    assert 0.05 <= n_findings[0] / 200 <= 0.2  # ~12% normal
    assert set(n_findings) == {0, 1, 2, 3, 4}
    assert (n_findings[3] + n_findings[4]) / 200 >= 0.3
    kinds = Counter(k for r in reports for k, _, _ in parse_mesh(r["MeSH"]))
    assert set(kinds) == set(FINDING_KINDS) and min(kinds.values()) >= 25
    assert len({r["findings"] for r in reports}) > 180  # paraphrase variety
    assert sum("XXXX" in r["findings"] for r in reports) >= 5  # anonymisation tokens like the real data
    sides = Counter(s for r in reports for k, s, _ in parse_mesh(r["MeSH"]) if k == "effusion")
    assert {"left", "right", "bilateral"} <= set(sides)
    devices = Counter(d for r in reports for k, _, d in parse_mesh(r["MeSH"]) if k == "device")
    assert set(devices) == {"pacemaker", "catheter", "endotracheal tube"}


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
    eff = draw([Finding("effusion", side="right", severity="moderate")])
    # basal right lung much brighter, left unchanged
    assert _lung_mean(eff, "right", 0.55, 0.68) - _lung_mean(normal, "right", 0.55, 0.68) > 40
    assert abs(_lung_mean(eff, "left", 0.55, 0.68) - _lung_mean(normal, "left", 0.55, 0.68)) < 5
    ptx = draw([Finding("pneumothorax", side="left", severity="large")])
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


def _frontal_128(findings: list[Finding]) -> np.ndarray:
    """The frontal view at the model's 128 px; the same anatomy and noise draws for every finding list."""
    anatomy = sample_anatomy(np.random.default_rng(0), findings)
    image = draw_frontal(findings, anatomy, np.random.default_rng(1), 256)
    return np.asarray(image.resize((128, 128), Image.BILINEAR), dtype=np.float32)


def _changed(findings: list[Finding]) -> np.ndarray:
    """Where the drawn findings change the image (vs a normal study) by more than the noise does."""
    return np.abs(_frontal_128(findings) - _frontal_128([])) > 20


R, L, ALL = (0.0, 0.5), (0.5, 1.0), (0.0, 1.0)  # image x: the patient's right is the image's left
# finding -> (x range, y range) of the image (fractions) that holds the change
WHERE_DRAWN = [
    (Finding("cardiomegaly", severity="moderate"), (0.2, 0.9), (0.45, 0.8)),
    (Finding("mediastinum", severity="mild"), (0.3, 0.7), (0.08, 0.5)),
    (Finding("consolidation", side="right", location="lower lobe"), R, (0.45, 0.75)),
    (Finding("consolidation", side="left", location="upper lobe"), L, (0.15, 0.45)),
    (Finding("nodule", side="left", location="mid"), L, (0.33, 0.55)),
    (Finding("nodule", side="right", location="upper"), R, (0.18, 0.40)),
    (Finding("opacity", side="left", location="lower"), L, (0.45, 0.72)),
    (Finding("opacity", side="right", location="upper"), R, (0.15, 0.42)),
    # the band inside the chest wall: above the lung apex, or along the lateral wall down to the costophrenic angle
    (Finding("pleural", side="right", location="apical"), R, (0.12, 0.30)),
    (Finding("pleural", side="left", location="lateral"), (0.72, 1.0), (0.25, 0.76)),
    # the band and the raised hemidiaphragm (volume loss), up to the midline
    (Finding("atelectasis", side="right", location="mid"), (0.0, 0.52), (0.35, 0.95)),
    (Finding("atelectasis", side="left", location="lower"), (0.48, 1.0), (0.45, 0.95)),
    (Finding("edema", side="bilateral", severity="moderate"), (0.2, 0.8), (0.25, 0.72)),
    (Finding("effusion", side="left", severity="small"), L, (0.5, 0.85)),
    (Finding("effusion", side="bilateral", severity="large"), ALL, (0.35, 0.85)),
    (Finding("pneumothorax", side="right", severity="small"), R, (0.1, 0.8)),
    # the lateral arc of the named rib: the outer third of that hemithorax, at that rib's height
    (Finding("fracture", side="left", location="upper"), (0.68, 1.0), (0.32, 0.46)),
    (Finding("fracture", side="right", location="lower"), (0.0, 0.32), (0.56, 0.72)),
    (Finding("device", side="left", location="pacemaker"), (0.4, 0.9), (0.1, 0.7)),
    (Finding("device", side="right", location="central venous catheter"), R, (0.0, 0.4)),
    (Finding("device", location="endotracheal tube"), (0.4, 0.6), (0.0, 0.3)),
]


@pytest.mark.parametrize(
    "finding, xs, ys", WHERE_DRAWN, ids=lambda v: v.mesh if isinstance(v, Finding) else ""
)
def test_every_finding_kind_is_drawn_where_its_report_says(finding, xs, ys):
    """Each kind changes the image visibly at 128 px, and only in the region its report names."""
    changed = _changed([finding])
    assert changed.sum() >= 10, f"{finding.mesh} is hardly visible ({changed.sum()} px changed)"
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    inside = (xx >= xs[0]) & (xx < xs[1]) & (yy >= ys[0]) & (yy < ys[1])
    assert (changed & inside).sum() >= 0.9 * changed.sum(), f"{finding.mesh} drawn outside {xs} x {ys}"
    if finding.side == "bilateral":  # both lungs
        assert min((changed & (xx < 0.5)).sum(), (changed & (xx >= 0.5)).sum()) >= 0.3 * changed.sum()
    for seed in range(4):  # and every paraphrase names the side, severity and location drawn
        findings_text, _ = write_report([finding], np.random.default_rng(seed))
        assert parse_findings_text(findings_text) == parse_mesh(finding.mesh), findings_text


def test_every_kind_is_covered_by_the_placement_check():
    assert {f.kind for f, _, _ in WHERE_DRAWN} == set(FINDING_KINDS)


def test_look_alike_findings_are_told_apart_the_way_a_radiologist_does():
    """Findings that share a place differ the way they do on a film: a lobar consolidation is denser than a
    patchy opacity over the same zone, and the right upper lobe's ends at the horizontal fissure with a sharp
    edge; a lateral pleural thickening runs along the chest wall far beyond a fracture's focal callus."""
    normal = _frontal_128([])
    consolidation = _frontal_128([Finding("consolidation", side="right", location="upper lobe")]) - normal
    opacity = _frontal_128([Finding("opacity", side="right", location="upper")]) - normal
    zone = (slice(int(0.24 * 128), int(0.36 * 128)), slice(int(0.22 * 128), int(0.36 * 128)))
    assert consolidation[zone].mean() > 1.4 * opacity[zone].mean() > 0
    column = consolidation[:, int(0.22 * 128) : int(0.36 * 128)].mean(axis=1)  # down the lobe
    step = column[:-2] - column[2:]  # the fall over 2 px, top to bottom
    assert step.max() > 0.5 * column.max()  # the fissure: half the density lost within 2 px
    assert 0.36 * 128 < step.argmax() < 0.44 * 128
    pleural = np.flatnonzero(_changed([Finding("pleural", side="left", location="lateral")]).any(axis=1))
    fracture = np.flatnonzero(_changed([Finding("fracture", side="left", location="mid")]).any(axis=1))
    assert np.ptp(pleural) > 2.5 * np.ptp(fracture)  # the image rows each one changes


@pytest.mark.parametrize("kind, location", [("consolidation", "lower lobe"), ("nodule", "mid"),
                                            ("opacity", "upper"), ("pleural", "lateral"), ("pleural", "apical"),
                                            ("atelectasis", "lower"), ("effusion", None), ("pneumothorax", None),
                                            ("fracture", "mid"), ("device", "pacemaker"),
                                            ("device", "central venous catheter")])  # fmt: skip
def test_left_stays_left(kind, location):
    """A finding on the patient's left is drawn on the image's right (and the report says left), and vice versa."""
    severity = {"effusion": "moderate", "pneumothorax": "large"}.get(kind)
    xx = np.mgrid[0:128, 0:128][1] / 128.0
    for side, on_image_right in (("left", True), ("right", False)):
        finding = Finding(kind, side=side, severity=severity, location=location)
        changed = _changed([finding])
        if kind == "device":  # the pacemaker's generator / the catheter's entry: its strongest pixels
            changed = np.abs(_frontal_128([finding]) - _frontal_128([])) > 60
        share_right = (changed & (xx >= 0.5)).sum() / changed.sum()
        assert share_right > 0.8 if on_image_right else share_right < 0.2, (finding, share_right)
        findings_text, impression = write_report([finding], np.random.default_rng(3))
        other = "right" if side == "left" else "left"
        assert side in findings_text.lower() and other not in findings_text.lower(), findings_text
        assert side in impression.lower() and other not in impression.lower(), impression


def test_lateral_view_superimposes_the_sides():
    """A lateral shows a lung finding without its side; rib fractures and pneumothoraces are not seen on it."""

    def lateral(findings):
        anatomy = sample_anatomy(np.random.default_rng(0), findings)
        return np.asarray(draw_lateral(findings, anatomy, np.random.default_rng(1), 128), dtype=np.float32)

    normal = lateral([])
    for kind, location in (("nodule", "upper"), ("atelectasis", "lower"), ("device", "pacemaker")):
        left, right = (lateral([Finding(kind, side=s, location=location)]) for s in ("left", "right"))
        assert np.array_equal(left, right), kind
        assert np.abs(left - normal).max() > 40, f"{kind} not seen on the lateral"
    for finding in (
        Finding("fracture", side="left", location="mid"),
        Finding("pneumothorax", "right", "large"),
    ):
        assert np.abs(lateral([finding]) - normal).max() < 30, finding
    for finding in (Finding("edema", "bilateral", "moderate"), Finding("mediastinum", severity="marked")):
        assert np.abs(lateral([finding]) - normal).max() > 25, finding


def test_sampled_finding_sets_are_mostly_unseen():
    """With the demo's 2,000 studies and split, most test studies show a finding set (with attributes) that no
    training study shows, so the nearest training report cannot describe them."""
    uids = [str(i + 1) for i in range(2000)]
    mesh = {uid: ";".join(f.mesh for f in sample_findings(np.random.default_rng([42, i]))) or "normal"
            for i, uid in enumerate(uids)}  # fmt: skip
    splits = assign_splits(uids, seed=42)
    novelty = finding_set_novelty({s: [mesh[u] for u in uids if splits[u] == s] for s in ("train", "test")})
    assert novelty["num_test"] == 400
    assert novelty["test_unseen_in_train"] >= 0.5, novelty
    # a split of identical sets has none unseen
    assert finding_set_novelty({"train": ["a;b", "normal"], "test": ["b;a"]})["test_unseen_in_train"] == 0.0
    # attributes make a set unseen; the headings alone (what the clinical efficacy scores read) may be seen
    sides = finding_set_novelty({"train": ["Nodule/lung/upper/left;Cardiomegaly/mild"],
                                 "test": ["Cardiomegaly/severe;Nodule/lung/upper/right", "Cardiomegaly/mild"]})  # fmt: skip
    assert sides["test_unseen_in_train"] == 1.0 and sides["test_headings_unseen_in_train"] == 0.5
    assert finding_set_novelty({"train": ["", ""], "test": [""]}) is None


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
    novelty = report["finding_sets"]
    assert novelty["num_test"] == 40 and 0.3 <= novelty["test_unseen_in_train"] <= 1.0


def test_phantom_reports_read_right_by_the_labeler(phantom_200, repo_root):
    """The CheXpert-style labeler reads each section as exactly the drawn findings' observations (uncertain
    counted as positive, as the clinical efficacy scores count it): "No Finding" when nothing but devices is
    drawn, and no observation a paraphrase adds by itself (e.g. "opacity" adding Lung Opacity)."""
    if not (repo_root / "metrics" / "radiology_report" / "labeler.py").is_file():
        pytest.skip("metrics/radiology_report/labeler.py not present")
    labeler = pytest.importorskip("xraycap.radiology_report.labeler")
    reports = _read_csv(phantom_200 / "indiana_reports.csv")
    texts = [r["findings"] for r in reports] + [r["impression"] for r in reports]
    labels = labeler.label_reports(texts)
    wrong = []
    for row, text, lab in zip(reports + reports, texts, labels):
        kinds = {k for k, _, _ in parse_mesh(row["MeSH"])}
        expected = {CHEXPERT_OBSERVATION[k] for k in kinds} | (
            {"No Finding"} if kinds <= {"device"} else set()
        )
        got = {name for name, value in lab.items() if value in (1, -1)}
        if got != expected:
            wrong.append((row["uid"], sorted(expected ^ got), text))
    assert not wrong, wrong[:5]


def test_an_older_generators_studies_are_redrawn(tmp_path):
    """A cached synthesis by an older phantom generator (same arguments, other studies) is replaced, not reused;
    other folders are still refused."""
    import json

    from xraycap.dataset_builder.synthesize import GENERATOR_VERSION, SETTINGS_JSON

    out = synthesize(tmp_path / "s", num_studies=3, seed=1, image_size=64, num_proc=1)
    settings = json.loads((out / SETTINGS_JSON).read_text())
    assert settings["version"] == GENERATOR_VERSION
    (out / SETTINGS_JSON).write_text(json.dumps({**settings, "version": GENERATOR_VERSION - 1}))
    (out / "indiana_reports.csv").write_text("uid,MeSH\n1,STALE-ROW\n")
    synthesize(out, num_studies=3, seed=1, image_size=64, num_proc=1)
    assert json.loads((out / SETTINGS_JSON).read_text())["version"] == GENERATOR_VERSION
    assert "STALE-ROW" not in (out / "indiana_reports.csv").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(out, num_studies=4, seed=1, image_size=64, num_proc=1)
