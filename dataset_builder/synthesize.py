"""Synthetic "phantom" chest X-ray studies written in the Kaggle Indiana layout.

Each study samples its findings (`phantom_findings`), draws a frontal and a lateral view of them
(`phantom_drawing`) and writes the report from exactly what was drawn (`phantom_report`), so a model can
only describe side and severity by looking at the image. Up to 4 findings a study, of twelve kinds read as
twelve CheXpert observations: cardiomegaly (mild / moderate / severe), a widened mediastinum (mild / marked),
lobar consolidation (side and lobe), nodule (side and zone), patchy lung opacity (side and zone), plate-like
atelectasis (side and zone), perihilar edema (mild / moderate), pleural effusion (side and size), pleural
thickening (side, apical or lateral), pneumothorax (side and size), a healing rib fracture (side and rib) and
support devices (pacemaker, central venous catheter, endotracheal tube); about 12% of the studies are normal.
Most studies' finding sets, with their attributes, occur in no other study.

Everything is deterministic from ``seed``: each study draws from its own ``numpy`` generator seeded with
``(seed, study_index)``, so the output does not depend on the number of worker processes.

The studies are written to a temporary folder next to ``output_dir`` and renamed into place once complete,
under an inter-process lock: a folder holding other files (real data) is refused unless ``overwrite=True``,
a folder already holding the same synthesis (``phantom_settings.json``, which names the generator's
version) is returned as it is, and the same synthesis by an older generator is replaced.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .folders import folder_lock, move_into_place, refuse_non_empty, temporary_sibling, write_text_atomic
from .phantom_drawing import draw_frontal, draw_lateral, sample_anatomy
from .phantom_findings import Finding, sample_findings
from .phantom_report import sample_indication, write_report

logger = logging.getLogger(__name__)

REPORTS_COLUMNS = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
PROJECTIONS_COLUMNS = ["uid", "filename", "projection"]
SETTINGS_JSON = "phantom_settings.json"
# Raised whenever the same seed would draw different studies; a folder of another version is re-synthesized.
GENERATOR_VERSION = 8


@dataclass
class Study:
    """A phantom study: what is drawn and what the report says."""

    uid: int
    findings_list: list[Finding] = field(default_factory=list)
    findings: str = ""
    impression: str = ""
    indication: str = ""

    @property
    def mesh(self) -> str:
        return ";".join(f.mesh for f in self.findings_list) or "normal"

    @property
    def problems(self) -> str:
        return ";".join(dict.fromkeys(f.problem for f in self.findings_list)) or "normal"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_study(index: int, seed: int, image_size: int) -> tuple[Study, list[tuple[str, str, bytes]]]:
    """Builds study number `index` (uid = index + 1): its report and its (filename, projection, png) images."""
    rng = np.random.default_rng([seed, index])
    uid = index + 1
    findings = sample_findings(rng)
    anatomy = sample_anatomy(rng, findings)
    nodule_cm = f"{rng.uniform(1.2, 2.2):.1f}"
    findings_text, impression = write_report(findings, rng, nodule_cm)
    study = Study(uid, findings, findings_text, impression, sample_indication(rng))
    img_rng = np.random.default_rng([seed, index, 1])
    series = 1000 + index
    frontal = draw_frontal(findings, anatomy, img_rng, image_size)
    lateral = draw_lateral(findings, anatomy, img_rng, image_size)
    images = [
        (f"{uid}_IM-{series:04d}-1001.dcm.png", "Frontal", _png_bytes(frontal)),
        (f"{uid}_IM-{series:04d}-2001.dcm.png", "Lateral", _png_bytes(lateral)),
    ]
    return study, images


def _make_chunk(args: tuple[list[int], int, int, str]) -> list[tuple[Study, list[tuple[str, str]]]]:
    indices, seed, image_size, image_dir = args
    out = []
    for i in indices:
        study, images = make_study(i, seed, image_size)
        for filename, _, data in images:
            with open(os.path.join(image_dir, filename), "wb") as fh:
                fh.write(data)
        out.append((study, [(fn, proj) for fn, proj, _ in images]))
    return out


def _write_csv_atomic(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def _settings_of(folder: Path) -> dict | None:
    """The settings of an earlier `synthesize` into `folder`, or None."""
    try:
        return json.loads((folder / SETTINGS_JSON).read_text())
    except (OSError, ValueError):
        return None


def _older_version_of(settings: dict):
    """A predicate on folders: True for one holding the same synthesis by an older generator (replaced: the same
    arguments now draw other studies)."""

    def older(folder: Path) -> bool:
        found = _settings_of(folder) or {}
        same = {k: v for k, v in found.items() if k != "version"} == {
            k: v for k, v in settings.items() if k != "version"
        }
        return bool(found) and same and found.get("version") != settings["version"]

    return older


def _write_studies(out: Path, num_studies: int, seed: int, image_size: int, num_proc: int | None) -> None:
    """Writes the images, then the two CSVs, into the (new, empty) folder `out`."""
    image_dir = out / "images" / "images_normalized"
    image_dir.mkdir(parents=True, exist_ok=True)
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if num_studies >= 200 else 1
    chunk = 50
    jobs = [
        (list(range(s, min(s + chunk, num_studies))), seed, image_size, str(image_dir))
        for s in range(0, num_studies, chunk)
    ]
    results: list[tuple[Study, list[tuple[str, str]]]] = []
    bar = tqdm(total=num_studies, desc="Synthesizing phantom studies", unit="study")
    if num_proc > 1:
        with ProcessPoolExecutor(max_workers=num_proc) as pool:
            for part in pool.map(_make_chunk, jobs):
                results.extend(part)
                bar.update(len(part))
    else:
        for job in jobs:
            part = _make_chunk(job)
            results.extend(part)
            bar.update(len(part))
    bar.close()

    # CSVs last and atomically (projections last of all): a folder with indiana_projections.csv is complete
    report_rows = [
        [
            s.uid,
            s.mesh,
            s.problems,
            "Xray Chest PA and Lateral",
            s.indication,
            "None.",
            s.findings,
            s.impression,
        ]
        for s, _ in results
    ]
    _write_csv_atomic(out / "indiana_reports.csv", REPORTS_COLUMNS, report_rows)
    projection_rows = [[s.uid, fn, proj] for s, images in results for fn, proj in images]
    _write_csv_atomic(out / "indiana_projections.csv", PROJECTIONS_COLUMNS, projection_rows)


def synthesize(
    output_dir: str | os.PathLike,
    num_studies: int = 2000,
    seed: int = 0,
    image_size: int = 256,
    num_proc: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes phantom chest X-ray studies in the Kaggle Indiana layout.

    Writes `indiana_reports.csv`, `indiana_projections.csv` and `images/images_normalized/*.png`
    (a frontal and a lateral 8-bit grayscale PNG per study). The MeSH and Problems columns hold the
    true drawn findings with their attributes (e.g. "Cardiomegaly/mild;Pleural Effusion/right/small", or "normal").

    Args:
        output_dir (`str` or `os.PathLike`): folder to write (created if needed).
        num_studies (`int`, defaults to 2000): number of studies (uids 1..num_studies).
        seed (`int`, defaults to 0): the same seed gives byte-identical CSVs and images.
        image_size (`int`, defaults to 256): side of the square PNGs in pixels.
        num_proc (`int`, *optional*): worker processes; defaults to the CPU count for >= 200 studies.
            The output does not depend on it.
        overwrite (`bool`, defaults to False): replace the contents of a non-empty `output_dir`. Without it,
            a folder holding the same synthesis (same `num_studies`, `seed`, `image_size` and generator
            version) is returned as it is, the same synthesis by an older generator is replaced, and any
            other non-empty folder raises `FileExistsError`.

    Returns:
        `Path`: the output folder, ready for `build_dataset(data_dir=...)`.
    """
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 px for visible findings, got {image_size}")
    out = Path(output_dir).expanduser().resolve()
    settings = {"num_studies": num_studies, "seed": seed, "image_size": image_size}
    if write_phantom_folder(
        out, settings, overwrite, lambda tmp: _write_studies(tmp, num_studies, seed, image_size, num_proc)
    ):
        logger.info("Wrote %d phantom studies (%d images) to %s", num_studies, 2 * num_studies, out)
    return out


def write_phantom_folder(out: Path, settings: dict, overwrite: bool, write) -> bool:
    """Writes a synthesis into `out` through `write(tmp_folder)`, under the folder's lock, into a temporary
    sibling renamed into place; a folder that already holds the same `settings` (and this generator version,
    added to them) is kept as it is, and the same synthesis by an older generator is replaced.

    Returns:
        `bool`: whether anything was written.
    """
    settings = {**settings, "version": GENERATOR_VERSION}
    with folder_lock(out):
        if not overwrite and _settings_of(out) == settings:
            logger.info(
                "%s already holds these %d phantom studies; nothing written", out, settings["num_studies"]
            )
            return False
        refuse_non_empty(
            out,
            overwrite,
            "phantom studies",
            "overwrite=True (--overwrite)",
            replaceable=_older_version_of(settings),
        )
        with temporary_sibling(out) as tmp:
            write(tmp)
            write_text_atomic(tmp / SETTINGS_JSON, json.dumps(settings, indent=1))
            move_into_place(tmp, out)
    return True
