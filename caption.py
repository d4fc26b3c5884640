"""Caption chest X-rays from the command line: `xraycap-caption` (or `python caption.py`).

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

from inference.model_source import (
    DEFAULT_MODEL,
    ModelSourceError,
    resolve_model_source,
    training_data_warning,
)
from metrics.radiology_report.labeler import CHEXPERT_OBSERVATIONS

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


def _load_views(study: Study, load_image) -> list[Any]:
    views = [load_image(study.frontal)]
    if study.lateral:
        views.append(load_image(study.lateral))
    return views


def _check_readable(path: str) -> None:
    if not path:
        raise ValueError("no image path given")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: file not found")
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder, not an image")


def caption_batches(
    studies: list[Study],
    model,
    processor,
    batch_size: int = 8,
    progress: bool = True,
    **generate_kwargs: Any,
) -> Iterator[list[Study]]:
    """
    Caption studies in batches, yielding each batch (in input order) as soon as it is done; a study whose
    images cannot be read gets `error` set, the rest still run.

    Args:
        studies (`list[Study]`): from `expand_inputs` / `read_pairs` (studies with `error` already set are
            yielded as they are, in their place).
        model: an `XrayCapForConditionalGeneration` (eval mode).
        processor: its `XrayCapProcessor`.
        batch_size (`int`, *optional*, defaults to 8): studies per `generate` call.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar on stderr.
        **generate_kwargs: passed to `model.generate` (`num_beams`, `max_new_tokens`, ...).

    Yields:
        `list[Study]`: the next studies, with `report` or `error` filled in.
    """
    import torch
    from tqdm.auto import tqdm

    load_image = _image_loader()
    device = next(model.parameters()).device
    todo = sum(s.error is None for s in studies)
    with tqdm(total=todo, desc="captioning", unit="study", disable=not progress, file=sys.stderr) as bar:
        for chunk in _batches(studies, max(1, batch_size)):
            pending = [study for study in chunk if study.error is None]
            ready, views = [], []
            for study in pending:
                try:
                    _check_readable(study.frontal)
                    if study.lateral:
                        _check_readable(study.lateral)
                    study_views = _load_views(study, load_image)
                    if len(study_views) > model.config.max_views:
                        raise ValueError(
                            f"{study.id}: a lateral was given but this model takes max_views={model.config.max_views}"
                        )
                except (OSError, ValueError, Image.DecompressionBombError) as error:
                    study.error = str(error)
                    continue
                ready.append(study)
                views.append(study_views)
            if ready:  # the processor pads every study to max_views (view_mask marks the real ones)
                inputs = processor(images=views, return_tensors="pt")
                view_mask = inputs.get("view_mask")
                with torch.inference_mode():
                    ids = model.generate(
                        pixel_values=inputs["pixel_values"].to(device),
                        view_mask=None if view_mask is None else view_mask.to(device),
                        **generate_kwargs,
                    )
                texts = processor.batch_decode(ids, skip_special_tokens=True)
                per_study = len(texts) // len(ready)  # num_return_sequences > 1: keep the first (best)
                for i, study in enumerate(ready):
                    study.report = texts[i * per_study].strip()
            bar.update(len(pending))
            yield chunk


def caption_studies(
    studies: list[Study], model, processor, batch_size: int = 8, progress: bool = True, **generate_kwargs: Any
) -> list[Study]:
    """`caption_batches` run to the end: the same `studies`, with `report` or `error` filled in."""
    for _ in caption_batches(studies, model, processor, batch_size, progress, **generate_kwargs):
        pass
    return studies


def _image_loader():
    try:
        from processing_xraycap import load_image
    except ImportError as error:  # pragma: no cover - the repo's own module
        raise ImportError(
            "processing_xraycap is not importable: install xraycap (pip install -e .)."
        ) from error
    return load_image


def add_findings(studies: list[Study]) -> None:
    """Run the CheXpert-style labeler over the captioned studies' reports (in place)."""
    from metrics.radiology_report.labeler import label_reports

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
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Saved XrayCap folder, or a Hub repo id with --trust_remote_code (default: {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Allow --model to be a Hub repo id: its Python code is downloaded and run here.",
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="Hub commit sha (or tag/branch) to load: pinning a reviewed commit is the safe way to run Hub code.",
    )
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


def load_model_and_processor(
    model_name: str,
    device: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **model_kwargs: Any,
):
    """
    Load an XrayCap folder (or, with `trust_remote_code`, a Hub repo) with its processor, in eval mode.

    Args:
        model_name (`str`): see `resolve_model_source`.
        device (`str`, *optional*): torch device (default: cuda when available, else cpu).
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow a Hub repo's code.
        revision (`str`, *optional*): the Hub commit to load.
        **model_kwargs: passed to `AutoModel.from_pretrained` (e.g. `attn_implementation`).
    """
    import torch
    from transformers import AutoModel, AutoProcessor

    source, load_kwargs = resolve_model_source(model_name, trust_remote_code, revision)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(source, **load_kwargs, **model_kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(source, **load_kwargs)
    return model, processor


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
        model, processor = load_model_and_processor(
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
        studies, model, processor, batch_size=args.batch_size, progress=not args.quiet, **generate_kwargs
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
