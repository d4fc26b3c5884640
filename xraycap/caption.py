"""Caption chest X-rays from the command line: `xraycap-caption` (or `python -m xraycap.caption`).

Examples:

    # one image, the report on stdout
    xraycap-caption chest.png
    # a folder (its image files, sorted) and a glob, written to JSONL with the labeler's findings
    xraycap-caption --model outputs/xraycap-demo scans/ "more/**/*.png" --output reports.jsonl
    # a frontal + lateral pair
    xraycap-caption frontal.png --lateral lateral.png
    # many pairs: a CSV with columns frontal,lateral (lateral may be empty; optional id column)
    xraycap-caption --pairs studies.csv --batch_size 16 --num_beams 3 --output reports.csv
    # a model on the Hub: its code runs on this machine, so say so, and pin the commit you reviewed
    xraycap-caption --model user/xraycap-iu --trust_remote_code --revision 4f1c2e0... chest.png

Reports are written by the image-to-text pipeline the model folder ships (`pipeline_xraycap.py`, loaded by
`xraycap.inference.model_source.load_pipeline`, as the demo loads it): the same text as
`pipeline("image-to-text", model=..., trust_remote_code=True)`.

`--model` is a local folder or, only with `--trust_remote_code`, a Hub repo id; a name that looks like a
path (`./x`, `~/x`, `/x`, `outputs/x` when `outputs/` exists, the default folder) and does not exist is an
error, never a download. `--revision` (a commit sha) is the safe way to load a Hub repo's code.

Each output record holds `id`, `frontal`, `lateral`, `report`, `error`, `warning` and the labeler's finding
for each of the 14 CheXpert observations (1 positive, 0 negative, -1 uncertain, empty/null not mentioned).
A file that is missing, unreadable, not an image in an accepted format, or too large (a decompression
bomb included) is reported on stderr (and as a record whose `error` says why) and the other studies still
run. Records are written as each batch finishes (the file is flushed), so an interrupted run keeps what
it did. For a model whose card says it was trained on the synthetic phantoms, every record's `warning`
says its reports describe phantoms only (and stderr says so once).

Exit status: 0 when every study was captioned; 1 when at least one input failed (missing, unreadable or
not an image, or a glob that matched nothing); 2 on a usage error (bad arguments, no inputs, model
folder not found, Hub id without --trust_remote_code, unknown output format, a --pairs CSV not in UTF-8).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from xraycap.inference.model_source import (
    ModelSourceError,
    add_model_arguments,
    load_pipeline,
    training_data_warning,
)
from xraycap.radiology_report.labeler import CHEXPERT_OBSERVATIONS

logger = logging.getLogger("xraycap.caption")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
EXIT_OK, EXIT_INPUT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """A command-line mistake (exit status 2)."""


@dataclass
class Study:
    """One study to caption: a frontal image and an optional lateral."""

    id: str
    frontal: str
    lateral: str | None = None
    error: str | None = None  # set when the inputs could not even be listed (e.g. an empty glob)
    report: str | None = None
    findings: dict[str, int | None] | None = field(default=None)
    warning: str | None = None  # what the reader must know about the model (e.g. phantom-trained)

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "frontal": self.frontal,
            "lateral": self.lateral,
            "report": self.report,
            "findings": self.findings,
            "error": self.error,
            "warning": self.warning,
        }


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def expand_inputs(inputs: Sequence[str]) -> list[Study]:
    """
    Turn command-line inputs (files, folders, globs) into studies, one per image.

    Args:
        inputs (`Sequence[str]`):
            File paths (kept whatever their extension; a missing one becomes a failed study), folders (their
            files with an image extension, sorted; other files are skipped with a log line) and globs (quoted
            so the shell leaves them alone; `**` recurses). A glob that matches nothing is a failed study.

    Returns:
        `list[Study]` in input order.
    """
    studies: list[Study] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if skipped:
                logger.info(
                    "%s: skipping %d non-image file(s): %s", path, len(skipped), ", ".join(skipped[:10])
                )
            if not images:
                studies.append(
                    Study(id=str(path), frontal=str(path), error=f"folder {path} holds no image files")
                )
            studies += [Study(id=str(p), frontal=str(p)) for p in images]
        elif not path.exists() and _has_glob(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                studies.append(Study(id=item, frontal=item, error=f"no file matches {item!r}"))
            studies += [Study(id=str(m), frontal=str(m)) for m in matches]
        else:
            studies.append(Study(id=item, frontal=item))
    return studies


def read_pairs(csv_path: str | Path) -> list[Study]:
    """
    Read frontal + lateral pairs from a CSV with columns `frontal` and `lateral` (and optionally `id`).

    A relative path is taken as given when it exists from the current folder, otherwise relative to the
    CSV's folder. An empty `lateral` means a frontal-only study.

    The CSV is read as UTF-8; a byte-order mark (as Excel writes) is skipped.

    Raises:
        `UsageError`: when the CSV is missing, not UTF-8, or lacks a `frontal` column.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UsageError(f"--pairs {csv_path}: file not found.")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "frontal" not in fields:
                raise UsageError(
                    f"--pairs {csv_path}: needs a 'frontal' column (and 'lateral'), found {fields}."
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as error:
        raise UsageError(
            f"--pairs {csv_path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}): save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet) and run again."
        ) from None

    def resolve(value: str) -> str:
        candidate = Path(value)
        if candidate.is_absolute() or candidate.exists():
            return value
        return str(csv_path.parent / candidate)

    studies = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if not row.get("frontal"):
            studies.append(
                Study(id=row.get("id") or f"{csv_path}:{number}", frontal="", error="empty 'frontal' cell")
            )
            continue
        frontal = resolve(row["frontal"])
        lateral = resolve(row["lateral"]) if row.get("lateral") else None
        studies.append(Study(id=row.get("id") or frontal, frontal=frontal, lateral=lateral))
    return studies


def _batches(items: list[Study], size: int) -> Iterator[list[Study]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_readable(path: str) -> None:
    if not path:
        raise ValueError("no image path given")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: file not found")
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder, not an image")


def _read_study(study: Study, max_views: int) -> tuple[Any, ...]:
    """The study's decoded views (frontal first), or an error naming the file that cannot be read."""
    from processing_xraycap import load_image

    paths = [study.frontal] + ([study.lateral] if study.lateral else [])
    if len(paths) > max_views:
        raise ValueError(f"{study.id}: a lateral was given but this model takes max_views={max_views}")
    for path in paths:
        _check_readable(path)
    return tuple(load_image(path) for path in paths)


def caption_batches(
    studies: list[Study], captioner, batch_size: int = 8, progress: bool = True, **generate_kwargs: Any
) -> Iterator[list[Study]]:
    """
    Caption studies in batches, yielding each batch (in input order) as soon as it is done; a study whose
    images cannot be read gets `error` set, the rest still run.

    Args:
        studies (`list[Study]`): from `expand_inputs` / `read_pairs` (studies with `error` already set are
            yielded as they are, in their place).
        captioner: the model's `XrayCapImageToTextPipeline` (`xraycap.inference.model_source.load_pipeline`).
        batch_size (`int`, *optional*, defaults to 8): studies per `generate` call.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar on stderr.
        **generate_kwargs: passed to `generate` (`num_beams`, `max_new_tokens`, ...).

    Yields:
        `list[Study]`: the next studies, with `report` or `error` filled in.
    """
    from tqdm.auto import tqdm

    max_views = captioner.model.config.max_views
    todo = sum(s.error is None for s in studies)
    with tqdm(total=todo, desc="captioning", unit="study", disable=not progress, file=sys.stderr) as bar:
        for chunk in _batches(studies, max(1, batch_size)):
            pending = [study for study in chunk if study.error is None]
            ready, views = [], []
            for study in pending:
                try:
                    views.append(_read_study(study, max_views))
                except (OSError, ValueError, Image.DecompressionBombError) as error:
                    study.error = str(error)
                    continue
                ready.append(study)
            if ready:  # one (frontal, lateral) tuple per study; the processor pads each to max_views
                outputs = captioner(views, batch_size=len(ready), **generate_kwargs)
                for study, candidates in zip(ready, outputs):  # num_return_sequences > 1: the first (best)
                    study.report = candidates[0]["generated_text"]
            bar.update(len(pending))
            yield chunk


def add_findings(studies: list[Study]) -> None:
    """Run the CheXpert-style labeler over the captioned studies' reports (in place)."""
    from xraycap.radiology_report.labeler import label_reports

    done = [s for s in studies if s.report is not None]
    if not done:
        return
    for study, labels in zip(done, label_reports([s.report for s in done])):
        study.findings = {name: labels.get(name) for name in CHEXPERT_OBSERVATIONS}


def write_jsonl(studies: list[Study], handle) -> None:
    for study in studies:
        handle.write(json.dumps(study.record(), ensure_ascii=False) + "\n")


CSV_COLUMNS = ["id", "frontal", "lateral", "report", "error", "warning", *CHEXPERT_OBSERVATIONS]


def write_csv(studies: list[Study], handle, header: bool = True) -> None:
    writer = csv.writer(handle)
    if header:
        writer.writerow(CSV_COLUMNS)
    for study in studies:
        findings = study.findings or {}
        writer.writerow(
            [
                study.id,
                study.frontal,
                study.lateral or "",
                study.report or "",
                study.error or "",
                study.warning or "",
                *["" if findings.get(name) is None else findings[name] for name in CHEXPERT_OBSERVATIONS],
            ]
        )


@contextlib.contextmanager
def record_sink(output: str | None) -> Iterator[Callable[[list[Study]], None]]:
    """
    Where finished batches go, written and flushed one batch at a time (a crash keeps the earlier ones).

    Args:
        output (`str`, *optional*): a `.jsonl` or `.csv` file, `"-"` (JSONL on stdout) or None (text on
            stdout, successful studies only).

    Yields:
        A function that writes one batch of studies.
    """
    if output is None or output == "-":
        stream = sys.stdout

        def write(batch: list[Study]) -> None:
            if output == "-":
                write_jsonl(batch, stream)
            else:
                for study in batch:
                    if study.error is None:
                        stream.write(format_text(study) + "\n\n")
            stream.flush()

        yield write
        return
    is_csv = output.lower().endswith(".csv")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="" if is_csv else None, encoding="utf-8") as handle:
        if is_csv:
            csv.writer(handle).writerow(CSV_COLUMNS)

        def write(batch: list[Study]) -> None:
            (write_csv(batch, handle, header=False) if is_csv else write_jsonl(batch, handle))
            handle.flush()
            os.fsync(handle.fileno())

        yield write


_WORDS = {1: "positive", 0: "negative", -1: "uncertain"}


def format_text(study: Study) -> str:
    lines = [f"== {study.id}" + (f" + {study.lateral}" if study.lateral else "")]
    lines.append(study.report if study.report else "(empty report)")
    if study.findings is not None:
        named = [f"{name}: {_WORDS[v]}" for name, v in study.findings.items() if v is not None]
        lines.append("findings: " + ("; ".join(named) if named else "none mentioned"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xraycap-caption",
        description="Write radiology reports for chest X-ray images with an XrayCap model folder.",
        epilog="Exit status: 0 all studies captioned; 1 some input failed (reported on stderr, the rest ran); "
        "2 usage error.",
    )
    parser.add_argument("inputs", nargs="*", help="Image files, folders (their image files) or quoted globs.")
    add_model_arguments(parser)
    parser.add_argument("--lateral", help="Lateral view of the single frontal image given as input.")
    parser.add_argument("--pairs", help="CSV with columns frontal,lateral (optional id): one study per row.")
    parser.add_argument("--batch_size", type=int, default=8, help="Studies per generate call (default: 8).")
    parser.add_argument(
        "--num_beams",
        type=int,
        default=None,
        help="Beam search width, 1 = greedy (default: the model's generation config).",
    )
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Report length cap in tokens.")
    parser.add_argument(
        "--output",
        "-o",
        help="Write records to this .jsonl or .csv file ('-' = JSONL on stdout) instead of text.",
    )
    parser.add_argument("--no_findings", action="store_true", help="Skip the CheXpert-style labeler.")
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)."
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    return parser


def _collect_studies(args: argparse.Namespace) -> list[Study]:
    if args.lateral and args.pairs:
        raise UsageError("--lateral and --pairs cannot be combined: put the pairs in the CSV.")
    studies: list[Study] = []
    if args.pairs:
        studies += read_pairs(args.pairs)
    if args.lateral:
        if len(args.inputs) != 1 or Path(args.inputs[0]).is_dir() or _has_glob(args.inputs[0]):
            raise UsageError(
                "--lateral needs exactly one frontal image file as input (use --pairs for many)."
            )
        studies.append(Study(id=args.inputs[0], frontal=args.inputs[0], lateral=args.lateral))
    else:
        studies += expand_inputs(args.inputs)
    if not studies:
        raise UsageError("no inputs: give image files, folders, globs or --pairs CSV.")
    return studies


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line.

    Args:
        argv (`Sequence[str]`, *optional*): arguments without the program name (default: `sys.argv[1:]`).

    Returns:
        `int`: 0 all captioned, 1 some input failed, 2 usage error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    output = args.output
    if output not in (None, "-") and Path(output).suffix.lower() not in (".jsonl", ".csv"):
        print(f"error: --output {output}: use a .jsonl or .csv file name (or '-').", file=sys.stderr)
        return EXIT_USAGE
    if args.batch_size < 1 or (args.num_beams is not None and args.num_beams < 1):
        print("error: --batch_size and --num_beams must be >= 1.", file=sys.stderr)
        return EXIT_USAGE
    try:
        studies = _collect_studies(args)
        captioner = load_pipeline(
            args.model, args.device, trust_remote_code=args.trust_remote_code, revision=args.revision
        )
    except (UsageError, ModelSourceError, OSError) as error:  # OSError: model folder / Hub id not loadable
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    warning = training_data_warning(args.model, args.revision)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)

    generate_kwargs: dict[str, Any] = {}
    if args.num_beams is not None:
        generate_kwargs["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    batches = caption_batches(
        studies, captioner, batch_size=args.batch_size, progress=not args.quiet, **generate_kwargs
    )
    with record_sink(output) as write:
        for batch in batches:
            if not args.no_findings:
                add_findings(batch)
            for study in batch:
                if study.report is not None:
                    study.warning = warning
            write(batch)

    failed = [s for s in studies if s.error is not None]
    for study in failed:
        print(f"failed: {study.id}: {study.error}", file=sys.stderr)
    done = len(studies) - len(failed)
    summary = f"captioned {done} of {len(studies)} studies"
    if output and output != "-":
        summary += f" -> {output}"
    if failed:
        summary += f"; {len(failed)} failed (listed above)"
    print(summary, file=sys.stderr)
    return EXIT_INPUT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
