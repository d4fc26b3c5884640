"""`python -m dataset_builder synthesize|build|download ...` (options and layouts: docs/DATA.md).

`build --format indiana` (default) reads the Kaggle layout; `build --format mimic-cxr` reads MIMIC-CXR-JPG with
the MIMIC-CXR reports (`--reports_dir` where they are not inside `--data_dir`); both write the same schema and
build report. `synthesize --format mimic-cxr` writes phantom studies in the MIMIC-CXR-JPG layout; `build --num_proc`
sets the processes that encode the images (default: every CPU this process may use).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .builder import build_dataset
from .configuration import SECTIONS, VIEWS
from .download import KAGGLE_HANDLE, download
from .formats import DEFAULT_FORMAT, FORMATS
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .synthesize import synthesize
from .synthesize_mimic import synthesize_mimic
from .text_cleaning import XXXX_MODES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dataset_builder",
        description=(
            "Chest X-ray studies (Indiana Kaggle layout, or MIMIC-CXR-JPG + reports) -> a study-level Arrow "
            "DatasetDict; phantom studies; download."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthesize", help="write phantom studies in the Kaggle (or MIMIC-CXR-JPG) layout")
    s.add_argument(
        "--output_dir",
        required=True,
        help="folder to write (indiana: CSVs + images/images_normalized/; mimic-cxr: .csv.gz tables + files/)",
    )
    s.add_argument(
        "--format",
        dest="data_format",
        choices=tuple(FORMATS),
        default=DEFAULT_FORMAT,
        help=f"layout to write (default {DEFAULT_FORMAT}); mimic-cxr: JPEGs, tables and reports as MIMIC-CXR-JPG",
    )
    s.add_argument("--num_studies", type=int, default=2000, help="number of studies (default 2000)")
    s.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical output (default 0)")
    s.add_argument(
        "--image_size", type=int, default=256, help="image side in pixels (PNG or JPEG; default 256)"
    )
    s.add_argument("--num_proc", type=int, default=None, help="worker processes (default: CPU count)")
    s.add_argument(
        "--overwrite", action="store_true", help="replace the contents of a non-empty --output_dir"
    )

    b = sub.add_parser("build", help="build the DatasetDict + build_report.json")
    b.add_argument(
        "--data_dir",
        required=True,
        help="indiana: folder with indiana_reports.csv, indiana_projections.csv, images/; mimic-cxr: the "
        "MIMIC-CXR-JPG folder with mimic-cxr-2.0.0-split.csv.gz, mimic-cxr-2.0.0-metadata.csv.gz, files/",
    )
    b.add_argument("--output_dir", required=True, help="where to save_to_disk the DatasetDict")
    b.add_argument(
        "--format",
        dest="data_format",
        choices=tuple(FORMATS),
        default=DEFAULT_FORMAT,
        help=f"layout of --data_dir (default {DEFAULT_FORMAT}); mimic-cxr is credentialed PhysioNet data you bring",
    )
    b.add_argument(
        "--reports_dir",
        default=None,
        help="mimic-cxr: folder holding the reports' files/p10/p10000032/s50414267.txt tree (default --data_dir)",
    )
    b.add_argument("--section", choices=SECTIONS, default="findings", help="target text (default findings)")
    b.add_argument("--views", choices=VIEWS, default="pair", help="images per study (default pair)")
    b.add_argument("--min_images", type=int, default=1, help="minimum usable images per study (default 1)")
    b.add_argument(
        "--image_size", type=int, default=512, help="longer side of re-encoded images (default 512)"
    )
    b.add_argument(
        "--seed", type=int, default=42, help="study-level split seed (default 42; mimic-cxr: official split)"
    )
    b.add_argument(
        "--r2gen", action="store_true", help="indiana: R2Gen population: findings, >= 2 images, 70/10/20"
    )
    b.add_argument(
        "--split_file", default=None, help="indiana: R2Gen annotation.json giving the split membership"
    )
    b.add_argument(
        "--xxxx",
        choices=XXXX_MODES,
        default="keep",
        help="anonymisation tokens in report (Indiana XXXX, MIMIC ___; default keep)",
    )
    b.add_argument(
        "--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="skip larger images"
    )
    b.add_argument("--cache_dir", default=None, help="datasets cache folder (default: HF datasets cache)")
    b.add_argument(
        "--writer_batch_size", type=int, default=64, help="examples per Arrow write (bounds memory)"
    )
    b.add_argument(
        "--num_proc",
        type=int,
        default=None,
        help="processes encoding the images (default: every CPU this process may use); same rows either way",
    )
    b.add_argument("--force_rebuild", action="store_true", help="ignore the cache and re-encode")
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output_dir that is not an earlier build",
    )

    d = sub.add_parser("download", help=f"fetch {KAGGLE_HANDLE} with kagglehub")
    d.add_argument("--output_dir", default=None, help="target folder (default: kagglehub's cache)")
    d.add_argument("--force", action="store_true", help="download again even if cached")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "build":
        _refuse_unsupported(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _refuse_unsupported(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with the usage and an error naming the flag when a build option does not apply to --format."""
    for option, why in FORMATS[args.data_format].unsupported_options.items():
        if getattr(args, option):
            parser.error(f"--{option} does not apply to --format {args.data_format}: {why}. Drop --{option}.")


def _run(args: argparse.Namespace) -> int:
    if args.command == "synthesize":
        mimic = args.data_format == "mimic-cxr"
        out = (synthesize_mimic if mimic else synthesize)(
            args.output_dir,
            args.num_studies,
            seed=args.seed,
            image_size=args.image_size,
            num_proc=args.num_proc,
            overwrite=args.overwrite,
        )
        print(f"Wrote {args.num_studies} phantom studies to {out}")
        fmt = " --format mimic-cxr" if mimic else ""
        print(f"Next: python -m dataset_builder build{fmt} --data_dir {out} --output_dir OUT")
        return 0
    if args.command == "download":
        try:
            path = download(args.output_dir, force=args.force)
        except ConnectionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"Downloaded to {path}")
        print(f"Next: python -m dataset_builder build --data_dir {path} --output_dir OUT")
        return 0
    _, report = build_dataset(
        args.data_dir,
        args.output_dir,
        data_format=args.data_format,
        reports_dir=args.reports_dir,
        section=args.section,
        views=args.views,
        min_images=args.min_images,
        image_size=args.image_size,
        seed=args.seed,
        r2gen=args.r2gen,
        split_file=args.split_file,
        xxxx=args.xxxx,
        max_image_pixels=args.max_image_pixels,
        cache_dir=args.cache_dir,
        writer_batch_size=args.writer_batch_size,
        force_rebuild=args.force_rebuild,
        overwrite=args.overwrite,
        num_proc=args.num_proc,
    )
    print(format_summary(report, args.output_dir))
    return 0


def format_summary(report: dict, output_dir: str | None = None) -> str:
    """The human summary printed by `build`: examples / images per split, skipped rows by reason."""
    lines = [
        f"Built from {report['num_reports']} reports and {report['num_projection_rows']} projection rows"
    ]
    if report.get("reused_cache"):
        lines[0] += " (reused the cache: nothing re-encoded)"
    lines.append("Examples per split:")
    for name, n in report["num_examples"].items():
        lines.append(f"  {name:<11} {n:>6} studies  {report['num_images'][name]:>6} images")
    lines.append(f"Skipped ({len(report['skipped'])} entries; study-level entries have no filename):")
    for reason, n in report["skipped_by_reason"].items():
        lines.append(f"  {n:>6}  {reason}")
    if not report["skipped_by_reason"]:
        lines.append("       0")
    acc = report["accounting"]
    lines.append(
        f"Accounting: reports {acc['reports']['in_examples']} + {acc['reports']['skipped']} = {acc['reports']['total']}; "
        f"projection rows {acc['projection_rows']['in_examples']} + {acc['projection_rows']['skipped']} = "
        f"{acc['projection_rows']['total']} ({'adds up' if acc['adds_up'] else 'DOES NOT ADD UP'})"
    )
    if output_dir:
        lines.append(f"Saved to {output_dir} (build_report.json alongside)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
