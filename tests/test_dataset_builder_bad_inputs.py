"""Bad inputs: each is kept (after conversion) or skipped with its reason; none crashes; counts add up."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from xraycap.dataset_builder import build_dataset
from xraycap.dataset_builder.images import to_grayscale_8bit

REPORT_HEADER = "uid,MeSH,Problems,image,indication,comparison,findings,impression\n"


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _bomb_png(side: int) -> bytes:
    """A valid 8-bit grayscale PNG of side x side black pixels (a few hundred KB on disk)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "data"
    images = root / "images" / "images_normalized"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = _png(rng.integers(0, 256, (300, 200), dtype=np.uint8))
    files = {
        "good.png": good,
        "good_lat.png": _png(rng.integers(0, 256, (200, 300), dtype=np.uint8)),
        "truncated.png": good[: len(good) // 2],
        "zero.png": b"",
        "text.png": b"this is a radiology report, not an image\n",
        "rgba.png": _png(
            np.dstack([np.full((60, 80, 3), 200, np.uint8), np.full((60, 80), 255, np.uint8)]), "RGBA"
        ),
        "bomb.png": _bomb_png(15000),  # 225 M pixels: above PIL's own bomb limit and ours
        "big.png": _bomb_png(8000),  # 64 M pixels: below PIL's error limit, above max_image_pixels (50 M)
        "other_good.png": good,
        "orphan.png": good,
    }
    # 16-bit with a 12-bit range (1000..3000): must be scaled by its actual range, not by 65535
    ramp = np.linspace(1000, 3000, 64 * 48).reshape(64, 48).astype(np.uint16)
    files["deep16.png"] = _png(ramp, "I;16")
    for name, data in files.items():
        (images / name).write_bytes(data)
    (root / "passwd_decoy").write_text("root:x:0:0\n")  # a file outside images/ a ../ name could reach
    reports = [
        ("1", "normal", "ok"),
        ("2", "normal", "truncated"),
        ("3", "normal", "zero byte"),
        ("4", "normal", "text file"),
        ("5", "normal", "16 bit"),
        ("6", "normal", "rgba"),
        ("7", "normal", "bomb"),
        ("8", "normal", "traversal"),
        ("9", "normal", '"Line one of the findings.\nLine two, with a ""quote"", after a newline."'),
        ("10", "normal", "no projection rows"),
        ("11", "normal", "big"),
        ("12", "normal", "traversal to a file that exists"),
    ]
    lines = [REPORT_HEADER]
    for uid, mesh, findings in reports:
        if not findings.startswith('"'):
            findings = f"Findings of study {uid}: {findings}."
        lines.append(f"{uid},{mesh},{mesh},Xray Chest,indication {uid},None,{findings},Impression {uid}.\n")
    (root / "indiana_reports.csv").write_text("".join(lines))
    proj = [
        ("1", "good.png", "Frontal"),
        ("1", "good_lat.png", "Lateral"),
        ("2", "truncated.png", "Frontal"),
        ("3", "zero.png", "Frontal"),
        ("4", "text.png", "Frontal"),
        ("5", "deep16.png", "Frontal"),
        ("6", "rgba.png", "Frontal"),
        ("7", "bomb.png", "Frontal"),
        ("8", "../../etc/passwd", "Frontal"),
        ("9", "other_good.png", "Frontal"),
        ("11", "big.png", "Frontal"),
        ("12", "../passwd_decoy", "Frontal"),
        ("12", "/etc/passwd", "Lateral"),
        ("99", "orphan.png", "Frontal"),  # uid only in the projections CSV
    ]
    (root / "indiana_projections.csv").write_text(
        "uid,filename,projection\n" + "".join(f"{u},{f},{p}\n" for u, f, p in proj)
    )
    return root


@pytest.fixture(scope="module")
def built(bad_data, tmp_path_factory):
    return build_dataset(bad_data, image_size=128, cache_dir=tmp_path_factory.mktemp("cache"))


def _reasons(report) -> dict[tuple[str, str | None], str]:
    return {(s["uid"], s["filename"]): s["reason"] for s in report["skipped"]}


def _examples(ds) -> dict[str, dict]:
    return {e["uid"]: e for split in ds for e in ds[split]}


def test_counts_add_up(built):
    ds, report = built
    assert report["num_reports"] == 12 and report["num_projection_rows"] == 14
    study_skips = [s for s in report["skipped"] if s["filename"] is None]
    row_skips = [s for s in report["skipped"] if s["filename"] is not None]
    examples = _examples(ds)
    assert len(examples) + len(study_skips) == 12
    assert sum(len(e["images"]) for e in examples.values()) + len(row_skips) == 14
    assert report["accounting"]["adds_up"]
    assert set(examples) == {"1", "5", "6", "9"}


def test_truncated_png_skipped(built):
    assert _reasons(built[1])[("2", "truncated.png")] == "unreadable or truncated image"
    assert _reasons(built[1])[("2", None)] == "too few usable images"


def test_zero_byte_and_text_file_are_not_images(built):
    reasons = _reasons(built[1])
    assert reasons[("3", "zero.png")] == "not an image"
    assert reasons[("4", "text.png")] == "not an image"
    details = {s["filename"]: s["detail"] for s in built[1]["skipped"]}
    assert "zero-byte" in details["zero.png"]


def test_16bit_converted_by_actual_range(built):
    im = _examples(built[0])["5"]["images"][0]
    arr = np.asarray(im)
    assert im.mode == "L" and arr.min() == 0 and arr.max() == 255  # full 8-bit range from 1000..3000
    assert 120 <= arr.mean() <= 135
    # the converter itself, on the other 16-bit mode PIL uses
    direct = to_grayscale_8bit(Image.fromarray(np.array([[0, 4095]], dtype=np.int32)))
    assert np.asarray(direct).tolist() == [[0, 255]]


def test_rgba_converted(built):
    im = _examples(built[0])["6"]["images"][0]
    assert im.mode == "L" and im.size == (80, 60)  # small images are never enlarged
    assert int(np.asarray(im).mean()) == 200


def test_decompression_bomb_skipped(built):
    reasons = _reasons(built[1])
    assert reasons[("7", "bomb.png")] == "image too large (decompression bomb guard)"
    assert reasons[("11", "big.png")] == "image too large (decompression bomb guard)"


def test_path_traversal_refused(built):
    reasons = _reasons(built[1])
    assert reasons[("8", "../../etc/passwd")] == "filename escapes the image folder"
    assert reasons[("12", "../passwd_decoy")] == "filename escapes the image folder"
    assert reasons[("12", "/etc/passwd")] == "filename escapes the image folder"


def test_multiline_quoted_field(built):
    ex = _examples(built[0])["9"]
    assert ex["findings"] == 'Line one of the findings.\nLine two, with a "quote", after a newline.'
    assert ex["report"] == 'Line one of the findings. Line two, with a "quote", after a newline.'


def test_uid_in_only_one_csv(built):
    reasons = _reasons(built[1])
    assert reasons[("10", None)] == "no projection rows"
    assert reasons[("99", "orphan.png")] == "uid not in reports CSV"


def test_resized_and_good(built):
    ex = _examples(built[0])["1"]
    assert [im.size for im in ex["images"]] == [(85, 128), (128, 85)]
    assert ex["projections"] == ["Frontal", "Lateral"]


def test_missing_column_stops_at_once(bad_data, tmp_path):
    data = tmp_path / "data"
    (data / "images" / "images_normalized").mkdir(parents=True)
    text = (bad_data / "indiana_reports.csv").read_text()
    (data / "indiana_reports.csv").write_text(text.replace("findings,impression", "impression", 1))
    (data / "indiana_projections.csv").write_text("uid,filename,projection\n1,a.png,Frontal\n")
    with pytest.raises(ValueError) as info:
        build_dataset(data, cache_dir=tmp_path / "c")
    assert "indiana_reports.csv" in str(info.value) and "['findings']" in str(info.value)
    (data / "indiana_reports.csv").write_text(text)
    (data / "indiana_projections.csv").write_text("uid,file,projection\n1,a.png,Frontal\n")
    with pytest.raises(
        ValueError, match=r"indiana_projections.csv is missing required column\(s\) \['filename'\]"
    ):
        build_dataset(data, cache_dir=tmp_path / "c")
    (data / "indiana_projections.csv").unlink()
    with pytest.raises(FileNotFoundError, match="indiana_projections.csv"):
        build_dataset(data, cache_dir=tmp_path / "c")


def test_duplicate_rows_accounted(tmp_path):
    data = tmp_path / "data"
    images = data / "images" / "images_normalized"
    images.mkdir(parents=True)
    Image.new("L", (40, 40), 100).save(images / "a.png")
    Image.new("L", (40, 40), 100).save(images / "b.png")
    (data / "indiana_reports.csv").write_text(
        REPORT_HEADER + "1,normal,normal,x,y,z,Findings one.,Imp.\n1,normal,normal,x,y,z,Again.,Imp.\n"
        "2,normal,normal,x,y,z,Findings two.,Imp.\n"
    )
    (data / "indiana_projections.csv").write_text(
        "uid,filename,projection\n1,a.png,Frontal\n1,a.png,Frontal\n2,b.png,Lateral\n"
    )
    ds, report = build_dataset(data, cache_dir=tmp_path / "c")
    assert report["skipped_by_reason"] == {"duplicate uid in reports CSV": 1, "duplicate projection row": 1}
    examples = {e["uid"]: e for split in ds for e in ds[split]}
    assert examples["1"]["findings"] == "Findings one." and examples["2"]["projections"] == ["Lateral"]
    assert report["accounting"]["adds_up"]
