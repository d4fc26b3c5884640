"""Synthetic phantom studies written in the official MIMIC-CXR-JPG layout (`synthesize --format mimic-cxr`).

The studies are the Indiana phantoms (`synthesize.make_study`: the same findings, drawings and reports, so a
richer phantom there is a richer one here), laid out as MIMIC-CXR-JPG with the MIMIC-CXR reports beside the
images, as `build --format mimic-cxr` reads them (see `mimic_cxr.py`):

```
OUTPUT_DIR/
  mimic-cxr-2.0.0-split.csv.gz      dicom_id,study_id,subject_id,split         (train / validate / test)
  mimic-cxr-2.0.0-metadata.csv.gz   dicom_id,subject_id,study_id,...,ViewPosition,Rows,Columns,...
  files/p10/p10000000/s50000000/<dicom_id>.jpg     (PA and LATERAL, 8-bit grayscale JPEG)
  files/p10/p10000000/s50000000.txt                (FINAL REPORT with INDICATION, FINDINGS, IMPRESSION)
```

Study `i` (0-based) has study_id 50000000 + i and belongs to patient `i // 3` (three studies a patient, spread
over the folders p10 ... p19 as in MIMIC); the split is by patient, as the official one: 80% train, 10%
validate, 10% test. Everything is deterministic from `seed` (a study's images and text depend only on
`(seed, i)`), whatever the number of worker processes. The images and reports are written as each worker makes
them (memory does not grow with `num_studies`); the two tables, a few hundred bytes a study, last. The folder is
written next to `output_dir` and renamed into place once complete, under the same lock and overwrite rules as
`synthesize`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import os
import re
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .mimic_cxr import METADATA_CSV, SPLIT_CSV, image_relpath, report_relpath
from .synthesize import Study, make_study, write_phantom_folder

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
VIEW_POSITIONS = {"Frontal": ("PA", "postero-anterior"), "Lateral": ("LATERAL", "lateral")}
STUDIES_PER_PATIENT = 3
CHUNK = 50  # studies per worker task
JPEG_QUALITY = 90


def ids_of(index: int) -> tuple[str, str, str]:
    """(study_id, subject_id, official split value) of study number `index`."""
    patient = index // STUDIES_PER_PATIENT
    subject = 10_000_000 + (patient % 10) * 1_000_000 + patient // 10  # folders p10 ... p19
    split = {8: "validate", 9: "test"}.get(patient % 10, "train")
    return str(50_000_000 + index), str(subject), split


def dicom_id_of(seed: int, index: int, image: int) -> str:
    """A MIMIC-style dicom_id (five dash-separated groups of 8 hex digits), fixed by (seed, study, image)."""
    digest = hashlib.sha1(f"{seed}/{index}/{image}".encode()).hexdigest()
    return "-".join(digest[k : k + 8] for k in range(0, 40, 8))


def _wrapped(text: str) -> str:
    """One report section as MIMIC-CXR writes it: wrapped at 70 columns, indented, with `___` (MIMIC's
    de-identification mark) where the phantom has Indiana's `XXXX`. Lines break at spaces only: a line that
    ended inside "left-sided" would read back as "left- sided"."""
    text = re.sub(r"\bX{4}\b", "___", " ".join(text.split()))
    return "\n".join(
        textwrap.wrap(text, 70, initial_indent=" ", subsequent_indent=" ", break_on_hyphens=False)
    )


def report_text(study: Study) -> str:
    """The study's report as a MIMIC-CXR free-text report (`mimic_cxr.parse_report` reads its sections)."""
    parts = [
        "                                 FINAL REPORT",
        " EXAMINATION:  CHEST (PA AND LAT)",
        " ",
        f" INDICATION:  {_wrapped(study.indication).strip()}",
        " ",
        " TECHNIQUE:  Chest PA and lateral",
        " ",
        " COMPARISON:  None.",
        " ",
    ]
    if study.findings.strip():
        parts += [" FINDINGS:", " ", _wrapped(study.findings), " "]
    if study.impression.strip():
        parts += [" IMPRESSION:", " ", _wrapped(study.impression)]
    return "\n".join(parts) + "\n"


def _jpeg(png: bytes) -> tuple[bytes, tuple[int, int]]:
    with Image.open(io.BytesIO(png)) as im:
        gray = im.convert("L")
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), gray.size


def _write_chunk(args: tuple[list[int], int, int, str]) -> list[tuple[list[str], list[str]]]:
    """Writes the JPEGs and reports of the studies `indices`; returns their (split row, metadata row) pairs."""
    indices, seed, image_size, root = args
    rows = []
    for index in indices:
        study, images = make_study(index, seed, image_size)
        study_id, subject_id, split = ids_of(index)
        report = Path(root) / report_relpath(subject_id, study_id)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(report_text(study), encoding="utf-8")
        for k, (_, projection, png) in enumerate(images):
            dicom_id = dicom_id_of(seed, index, k)
            path = Path(root) / image_relpath(subject_id, study_id, dicom_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            data, (width, height) = _jpeg(png)
            path.write_bytes(data)
            view, meaning = VIEW_POSITIONS.get(projection, (projection.upper(), projection.lower()))
            date = f"{2100 + index % 80:04d}{1 + index % 12:02d}{1 + index % 28:02d}"
            rows.append(
                (
                    [dicom_id, study_id, subject_id, split],
                    [dicom_id, subject_id, study_id, "CHEST (PA AND LAT)", view, str(height), str(width)]
                    + [date, f"{100000 + index % 86400}.000", "Chest 2 Views", meaning, "Erect"],
                )
            )
    return rows


def _write_gz_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """A gzipped CSV with a fixed gzip timestamp (same inputs, same bytes)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
        fh.write(text.getvalue().encode("utf-8"))


def _write_studies(out: Path, num_studies: int, seed: int, image_size: int, num_proc: int) -> None:
    jobs = [
        (list(range(s, min(s + CHUNK, num_studies))), seed, image_size, str(out))
        for s in range(0, num_studies, CHUNK)
    ]
    split_rows: list[list[str]] = []
    metadata_rows: list[list[str]] = []
    bar = tqdm(total=num_studies, desc="Synthesizing phantom MIMIC-CXR studies", unit="study")
    with ProcessPoolExecutor(max_workers=num_proc) if num_proc > 1 else _InProcess() as pool:
        for job, part in zip(jobs, pool.map(_write_chunk, jobs)):
            split_rows.extend(row for row, _ in part)
            metadata_rows.extend(row for _, row in part)
            bar.update(len(job[0]))
    bar.close()
    # the tables last: a folder holding both is complete (the split table last of all)
    _write_gz_csv(out / METADATA_CSV, METADATA_COLUMNS, metadata_rows)
    _write_gz_csv(out / SPLIT_CSV, SPLIT_COLUMNS, split_rows)


class _InProcess:
    """`ProcessPoolExecutor`'s `map` in this process (one worker: no pool to start)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, iterable):
        return map(fn, iterable)


def synthesize_mimic(
    output_dir: str | os.PathLike,
    num_studies: int = 2000,
    seed: int = 0,
    image_size: int = 256,
    num_proc: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes phantom chest X-ray studies in the MIMIC-CXR-JPG layout, reports included.

    Args:
        output_dir (`str` or `os.PathLike`): folder to write (created if needed); build it with
            `build_dataset(output_dir, data_format="mimic-cxr")`.
        num_studies (`int`, defaults to 2000): number of studies (two images each: PA and LATERAL).
        seed (`int`, defaults to 0): the same seed gives byte-identical tables, images and reports.
        image_size (`int`, defaults to 256): side of the square JPEGs in pixels.
        num_proc (`int`, *optional*): worker processes; defaults to the CPUs this process may use for >= 200
            studies (1 below). The output does not depend on it.
        overwrite (`bool`, defaults to False): replace the contents of a non-empty `output_dir`. Without it, a
            folder holding the same synthesis is returned as it is and any other non-empty folder raises
            `FileExistsError`.

    Returns:
        `Path`: the output folder.
    """
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies} (--num_studies)")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 px for visible findings, got {image_size} (--image_size)")
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc} (--num_proc)")
    if num_proc is None:
        from .builder import default_num_proc

        num_proc = default_num_proc() if num_studies >= 200 else 1
    out = Path(output_dir).expanduser().resolve()
    settings = {"format": "mimic-cxr", "num_studies": num_studies, "seed": seed, "image_size": image_size}
    if write_phantom_folder(
        out, settings, overwrite, lambda tmp: _write_studies(tmp, num_studies, seed, image_size, num_proc)
    ):
        logger.info("Wrote %d phantom studies in the MIMIC-CXR-JPG layout to %s", num_studies, out)
    return out
