"""Pictures of a training run: training curves and a contact sheet of test predictions.

`run_captioning.py` calls both at the end of a run and writes them into the output folder:

- `plot_training_curves(history, "outputs/xraycap-demo/training_curves.png")`
- `write_samples_sheet(records, ".../samples.png", ".../samples.html")`

Matplotlib runs with the non-interactive Agg backend, so both work on machines without a display.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.utils import logging  # noqa: E402

logger = logging.get_logger(__name__)

__all__ = ["plot_training_curves", "write_samples_sheet"]

# Counters that may sit in an epoch entry next to the metrics; they are not drawn.
_NOT_METRICS = ("epoch", "step", "completed_steps", "global_step")


def _check_history(history: dict[str, Any]) -> tuple[list[float], list[float], list[float], list[dict]]:
    if not isinstance(history, dict):
        raise ValueError(f"history must be a dict, got {type(history).__name__}.")
    steps = list(history.get("step", []))
    loss = list(history.get("loss", []))
    lr = list(history.get("lr", []))
    if len(loss) != len(steps):
        raise ValueError(
            f"history['loss'] has {len(loss)} values but history['step'] has {len(steps)}: log one loss per step."
        )
    if lr and len(lr) != len(steps):
        raise ValueError(
            f"history['lr'] has {len(lr)} values but history['step'] has {len(steps)}: log one lr per step "
            "(or leave 'lr' empty)."
        )
    epoch_metrics = list(history.get("epoch_metrics", []))
    for i, entry in enumerate(epoch_metrics):
        if not isinstance(entry, dict) or "epoch" not in entry:
            raise ValueError(f"history['epoch_metrics'][{i}] = {entry!r} must be a dict with an 'epoch' key.")
    return steps, loss, lr, epoch_metrics


def plot_training_curves(history: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """
    Draw the training loss and learning rate per optimiser step and the validation metrics per epoch.

    Args:
        history (`dict`):
            The run's log, in this format (every list may be empty; `lr` may be left out)::

                {
                    "step": [1, 2, ...],            # optimiser step of each logged value
                    "loss": [3.1, 2.9, ...],        # training loss at that step (same length as "step")
                    "lr": [1e-4, 1e-4, ...],        # learning rate at that step (same length as "step")
                    "epoch_metrics": [              # one dict per validation run
                        {"epoch": 1, "ce_macro_f1": 0.41, "bleu_4": 0.12, "eval_loss": 2.2, ...},
                        ...
                    ],
                }

            Every numeric key of an `epoch_metrics` entry other than the counters `epoch`, `step`,
            `completed_steps` and `global_step` is drawn as one line; keys
            containing "loss" go on the right-hand axis (their scale differs from scores in [0, 1]).
        path (`str` or `Path`):
            Where to write the PNG (parent folders are created).
        title (`str`, *optional*):
            A title above the three panels.

    Returns:
        `Path`: the written file.

    Raises:
        `ValueError`: when the lists' lengths disagree or an epoch entry has no "epoch".
    """
    steps, loss, lr, epoch_metrics = _check_history(history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss, ax_lr, ax_val = axes

    kept = [(step, value) for step, value in zip(steps, loss) if value is not None]  # skipped steps: None
    loss_steps, loss = [step for step, _ in kept], [value for _, value in kept]
    if loss_steps:
        ax_loss.plot(loss_steps, loss, color="tab:blue", linewidth=1.0, alpha=0.5, label="loss")
        if len(loss) >= 10:  # a moving average makes the trend readable on noisy per-step losses
            window = max(2, len(loss) // 20)
            smooth = [
                sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1])
                for i in range(len(loss))
            ]
            ax_loss.plot(loss_steps, smooth, color="tab:blue", linewidth=2.0, label=f"mean of {window}")
        ax_loss.legend(loc="upper right")
    else:
        ax_loss.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_title("training loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.grid(alpha=0.3)

    if lr:
        ax_lr.plot(steps, lr, color="tab:orange")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        ax_lr.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=ax_lr.transAxes)
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)

    ax_val.set_title("validation (per epoch)")
    ax_val.set_xlabel("epoch")
    ax_val.grid(alpha=0.3)
    if epoch_metrics:
        epochs = [entry["epoch"] for entry in epoch_metrics]
        keys: list[str] = []
        for entry in epoch_metrics:
            for key, value in entry.items():
                if (
                    key not in _NOT_METRICS
                    and key not in keys
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    keys.append(key)
        score_keys = [k for k in keys if "loss" not in k]
        loss_keys = [k for k in keys if "loss" in k]
        lines = []
        for key in score_keys:
            values = [entry.get(key, math.nan) for entry in epoch_metrics]
            lines += ax_val.plot(epochs, values, marker="o", label=key)
        ax_val.set_ylabel("score")
        if loss_keys:
            ax_right = ax_val.twinx()
            for key in loss_keys:
                values = [entry.get(key, math.nan) for entry in epoch_metrics]
                lines += ax_right.plot(epochs, values, marker="s", linestyle="--", color="black", label=key)
            ax_right.set_ylabel("loss")
        if lines:
            ax_val.legend(lines, [line.get_label() for line in lines], loc="best", fontsize="small")
    else:
        ax_val.text(0.5, 0.5, "no validation run", ha="center", va="center", transform=ax_val.transAxes)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    logger.info("Wrote training curves to %s", path)
    return path


def _check_records(records: Sequence[dict[str, Any]]) -> None:
    required = ("id", "image", "reference", "prediction")
    for i, record in enumerate(records):
        missing = [key for key in required if key not in record]
        if missing:
            raise ValueError(
                f"samples record {i} lacks {missing}: each record needs {required} (+ 'differing_findings')."
            )
        if not isinstance(record["image"], Image.Image):
            raise ValueError(
                f"samples record {i} (id {record['id']!r}): 'image' must be a PIL image, got {type(record['image']).__name__}."
            )


def _thumbnail(image: Image.Image, size: int) -> Image.Image:
    thumb = image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()
    thumb.thumbnail((size, size))
    return thumb


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width=width)) if text else "(empty)"


def write_samples_sheet(
    records: Sequence[dict[str, Any]],
    path_png: str | Path,
    path_html: str | Path,
    max_png_records: int = 12,
    thumbnail_size: int = 256,
) -> tuple[Path, Path]:
    """
    Write a contact sheet of test studies: the image, the reference report, the model's report and the
    findings on which the two disagree (per the labeler).

    Args:
        records (`Sequence[dict]`):
            One dict per study: `{"id": str, "image": PIL.Image.Image, "reference": str, "prediction": str,
            "differing_findings": list[str]}` (`differing_findings` may be left out: nothing differs).
        path_png (`str` or `Path`):
            The PNG sheet (one row per study, the first `max_png_records` studies).
        path_html (`str` or `Path`):
            A self-contained HTML page (thumbnails embedded as base64) with every record.
        max_png_records (`int`, *optional*, defaults to 12):
            Rows in the PNG; the HTML holds all records.
        thumbnail_size (`int`, *optional*, defaults to 256):
            Longest side in pixels of the HTML thumbnails.

    Returns:
        `tuple[Path, Path]`: the PNG and HTML paths.

    Raises:
        `ValueError`: when a record lacks a key or its image is not a PIL image.
    """
    records = list(records)
    _check_records(records)
    path_png, path_html = Path(path_png), Path(path_html)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    path_html.parent.mkdir(parents=True, exist_ok=True)

    shown = records[:max_png_records]
    rows = max(1, len(shown))
    fig, axes = plt.subplots(
        rows, 2, figsize=(13, 2.9 * rows), gridspec_kw={"width_ratios": [1, 3.4]}, squeeze=False
    )
    if not shown:
        for ax in axes[0]:
            ax.axis("off")
        axes[0][1].text(0, 0.5, "no test studies", va="center")
    for row, record in enumerate(shown):
        ax_img, ax_txt = axes[row]
        ax_img.imshow(_thumbnail(record["image"], 256), cmap="gray")
        ax_img.set_title(str(record["id"]), fontsize=9)
        ax_img.axis("off")
        ax_txt.axis("off")
        differing = list(record.get("differing_findings") or [])
        for y, key, color in ((1.0, "reference", "black"), (0.55, "prediction", "navy")):
            text = f"{key}: " + _wrap(str(record[key]), 95)
            ax_txt.text(0, y, text, va="top", fontsize=8, family="monospace", color=color)
        summary = "differing findings: " + (", ".join(differing) if differing else "none")
        ax_txt.text(0, 0.08, summary, va="top", fontsize=8, color="firebrick" if differing else "darkgreen")
    fig.tight_layout()
    fig.savefig(path_png, dpi=80)
    plt.close(fig)

    rows_html = []
    for record in records:
        buffer = io.BytesIO()
        _thumbnail(record["image"], thumbnail_size).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        differing = list(record.get("differing_findings") or [])
        diff_html = (
            "<span class='bad'>" + html.escape(", ".join(differing)) + "</span>"
            if differing
            else "<span class='ok'>none</span>"
        )
        rows_html.append(
            "<tr>"
            f"<td><img src='data:image/png;base64,{data}' alt='{html.escape(str(record['id']))}'>"
            f"<div class='id'>{html.escape(str(record['id']))}</div></td>"
            f"<td>{html.escape(str(record['reference']))}</td>"
            f"<td>{html.escape(str(record['prediction']))}</td>"
            f"<td>{diff_html}</td>"
            "</tr>"
        )
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>xraycap test samples</title>\n"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:6px;vertical-align:top;max-width:420px}"
        "img{max-width:256px}.id{font-size:small;color:#555}.bad{color:#b22}.ok{color:#282}</style>\n"
        f"</head><body><h1>xraycap: {len(records)} test studies</h1>\n"
        "<table><tr><th>image</th><th>reference</th><th>prediction</th><th>findings that differ</th></tr>\n"
        + "\n".join(rows_html)
        + "\n</table></body></html>\n"
    )
    path_html.write_text(page, encoding="utf-8")
    logger.info("Wrote samples sheet to %s and %s", path_png, path_html)
    return path_png, path_html
