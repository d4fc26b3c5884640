"""xraycap.training.figures: training curves and the samples contact sheet are written and are valid files."""

from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from xraycap.training.figures import plot_training_curves, write_samples_sheet


def _history(num_steps=40, num_epochs=3):
    steps = list(range(1, num_steps + 1))
    return {
        "step": steps,
        "loss": [3.0 * 0.97**s for s in steps],
        "lr": [1e-3 * min(1.0, s / 5) for s in steps],
        "epoch_metrics": [
            {"epoch": e, "step": 10 * e, "ce_macro_f1": 0.2 * e, "bleu_4": 0.05 * e, "eval_loss": 2.0 / e}
            for e in range(1, num_epochs + 1)
        ],
    }


def _non_white_fraction(path):
    pixels = np.asarray(Image.open(path).convert("L"))
    return float((pixels < 250).mean())


def test_training_curves_png_is_valid(tmp_path):
    path = plot_training_curves(_history(), tmp_path / "sub" / "training_curves.png", title="tiny run")
    assert path.is_file()
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 300
    # Something was drawn: lines, axes and text cover a real part of the canvas.
    assert _non_white_fraction(path) > 0.02


def test_training_curves_accepts_empty_history(tmp_path):
    path = plot_training_curves({"step": [], "loss": [], "epoch_metrics": []}, tmp_path / "empty.png")
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_training_curves_rejects_mismatched_lengths(tmp_path):
    history = _history()
    history["loss"] = history["loss"][:-1]
    with pytest.raises(ValueError, match="loss"):
        plot_training_curves(history, tmp_path / "bad.png")
    history = _history()
    history["epoch_metrics"] = [{"ce_macro_f1": 0.3}]
    with pytest.raises(ValueError, match="epoch"):
        plot_training_curves(history, tmp_path / "bad.png")


class _TableParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []
        self.rows = 0
        self.text = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "tr":
            self.rows += 1

    def handle_data(self, data):
        self.text.append(data)


def _records(n):
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        pixels = (rng.random((96, 80)) * 255).astype(np.uint8)
        records.append(
            {
                "id": f"study-{i}",
                "image": Image.fromarray(pixels, mode="L"),
                "reference": f"Heart size is normal. <No> pleural effusion {i}.",
                "prediction": "The heart is enlarged. " * (i + 1),
                "differing_findings": ["Cardiomegaly"] if i % 2 else [],
            }
        )
    return records


def test_samples_sheet_png_and_html(tmp_path):
    records = _records(5)
    png, page = write_samples_sheet(
        records, tmp_path / "samples.png", tmp_path / "samples.html", max_png_records=3
    )
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.height > image.width / 2  # three rows
    assert _non_white_fraction(png) > 0.02

    source = page.read_text(encoding="utf-8")
    parser = _TableParser()
    parser.feed(source)
    assert parser.rows == 1 + len(records)  # header + every record (the HTML is not capped)
    assert len(parser.images) == len(records)
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    text = " ".join(parser.text)
    for record in records:
        assert record["id"] in text
    assert "<No>" in text and "&lt;No&gt;" in source  # report text is escaped, not injected as HTML
    assert "Cardiomegaly" in text


def test_samples_sheet_rejects_bad_records(tmp_path):
    records = _records(1)
    records[0]["image"] = "not an image"
    with pytest.raises(ValueError, match="PIL"):
        write_samples_sheet(records, tmp_path / "s.png", tmp_path / "s.html")
    with pytest.raises(ValueError, match="prediction"):
        write_samples_sheet(
            [{"id": "x", "image": Image.new("L", (8, 8)), "reference": "a"}],
            tmp_path / "s.png",
            tmp_path / "s.html",
        )


def test_training_curves_draws_metrics_not_counters(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot_training_curves(_history(), tmp_path / "curves.png")
    assert {"ce_macro_f1", "bleu_4", "eval_loss"} <= set(labels)
    assert "step" not in labels and "epoch" not in labels
