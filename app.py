"""XrayCap demo: a Gradio app in the form Hugging Face Spaces runs (`app.py` with a top-level `demo`).

Upload a frontal chest X-ray (and optionally the lateral view), pick the number of beams, and get the
model's report, the findings a CheXpert-style labeler reads in it, and, for "grid" models, a heat map of
where the report's tokens attended in the image.

Run it:

    python app.py                                   # model folder outputs/xraycap-demo
    python app.py --model path/to/folder --port 7860
    XRAYCAP_MODEL=path/to/folder python app.py      # what a Space sets as a variable
    python app.py --model user/xraycap-iu --trust_remote_code --revision <commit sha>   # a Hub repo

Reports come from the image-to-text pipeline the model folder ships (`pipeline_xraycap.py`), loaded by
`xraycap.inference.model_source.load_pipeline` as the command line loads it; the heat map re-reads the ids it
generated with the pipeline's model.

The model comes from `--model`, else the `XRAYCAP_MODEL` environment variable, else `outputs/xraycap-demo`
(written by `python run_captioning.py`). A Hub repo id runs that repo's code, so it
needs `--trust_remote_code` (or `XRAYCAP_TRUST_REMOTE_CODE=1`); `--revision` / `XRAYCAP_REVISION` pins the
commit, the safe way. A name that looks like a path and does not exist is an error, never a download.
Uploads reach the processor as uploaded (16-bit films keep their depth), up to `MAX_FILE_SIZE`. For a
model whose card says it was trained on the synthetic phantoms, a warning stands beside the report.
Host and port follow Gradio's `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` unless `--host` / `--port` are
given.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image
from xraycap.radiology_report.labeler import CHEXPERT_OBSERVATIONS

from xraycap.inference.model_source import (
    DEFAULT_MODEL,
    add_model_arguments,
    load_pipeline,
    training_data_warning,
)

logger = logging.getLogger("xraycap.app")

MAX_FILE_SIZE = "100mb"  # per upload: a 50-megapixel 16-bit film fits, anything far larger is refused
_FINDING_WORDS = {1: "positive", 0: "negative", -1: "uncertain", None: "not mentioned"}
OVERLAY_SIDE = 320  # px of each view in the heat-map picture
# System fonts: the default theme fetches web fonts, which offline machines cannot. Gradio 6 takes the
# theme in launch(), Gradio 5 in Blocks().
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"])
_THEME_AT_LAUNCH = "theme" in inspect.signature(gr.Blocks.launch).parameters


def resolve_model_dir(argv: list[str] | None = None) -> str:
    """`--model` in `argv`, else `$XRAYCAP_MODEL`, else `outputs/xraycap-demo`."""
    return resolve_model_options(argv).model


@dataclass
class ModelOptions:
    """Which model the app serves and what the user allowed for it."""

    model: str
    trust_remote_code: bool = False
    revision: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """`python app.py`'s options: the model ones shared with the command line, then host and port."""
    parser = argparse.ArgumentParser(
        description="XrayCap Gradio demo.",
        epilog="Unset model options fall back on XRAYCAP_MODEL, XRAYCAP_TRUST_REMOTE_CODE=1 and XRAYCAP_REVISION.",
    )
    add_model_arguments(parser, default=None)
    parser.add_argument("--host", default=None, help="server name (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, 7860)")
    return parser


def resolve_model_options(argv: list[str] | None = None) -> ModelOptions:
    """`--model` / `--trust_remote_code` / `--revision` in `argv`, else `$XRAYCAP_MODEL` /
    `$XRAYCAP_TRUST_REMOTE_CODE` (1, true or yes) / `$XRAYCAP_REVISION`, else the default folder."""
    args, _ = build_parser().parse_known_args(argv or [])
    trust_env = os.environ.get("XRAYCAP_TRUST_REMOTE_CODE", "").strip().lower() in ("1", "true", "yes")
    return ModelOptions(
        model=args.model or os.environ.get("XRAYCAP_MODEL") or DEFAULT_MODEL,
        trust_remote_code=args.trust_remote_code or trust_env,
        revision=args.revision or os.environ.get("XRAYCAP_REVISION") or None,
    )


class Captioner:
    """
    The model's own image-to-text pipeline, loaded once (thread-safe, on first use), with attention maps.

    Args:
        model_dir (`str`): a saved XrayCap folder, or a Hub repo id with `trust_remote_code`.
        device (`str`, *optional*): torch device; cuda when available, else cpu.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow a Hub repo's code to run.
        revision (`str`, *optional*): the Hub commit to load (pin one: the safe way).
    """

    def __init__(
        self,
        model_dir: str,
        device: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ):
        self.model_dir = model_dir
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self._lock = threading.Lock()
        self._pipeline = None

    def load(self):
        """The `XrayCapImageToTextPipeline` (its `.model` and `.processor` loaded), built on first use.

        Raises:
            `FileNotFoundError` for a path-like name that does not exist; `ModelSourceError` for a Hub repo id
            without `trust_remote_code`.
        """
        with self._lock:
            if self._pipeline is None:
                # Eager attention: the SDPA kernels return no attention weights, which the heat map needs.
                self._pipeline = load_pipeline(
                    self.model_dir,
                    self.device,
                    trust_remote_code=self.trust_remote_code,
                    revision=self.revision,
                    attn_implementation="eager",
                )
                logger.info("Loaded %s on %s", self.model_dir, self._pipeline.device)
            return self._pipeline

    def generate(
        self, views: list[Any], num_beams: int = 1, max_new_tokens: int | None = None
    ) -> dict[str, Any]:
        """
        Write the report for one study with the pipeline, stage by stage so the heat map can re-read the ids.

        Args:
            views (`list`): the frontal image then optionally the lateral (PIL images or paths).
            num_beams (`int`): beam width (1 = greedy).
            max_new_tokens (`int`, *optional*): length cap.

        Returns:
            `dict` with `report` (str, what `pipeline(study)` returns), `ids` (the generated token ids, 1-D),
            `pixel_values` and `view_mask` (the processor's batch of one study).
        """
        captioner = self.load()
        generate_kwargs: dict[str, Any] = {"num_beams": int(num_beams)}
        if max_new_tokens:
            generate_kwargs["max_new_tokens"] = int(max_new_tokens)
        model_inputs = captioner.preprocess(tuple(views))
        outputs = captioner.forward(model_inputs, generate_kwargs=generate_kwargs)
        report = captioner.postprocess(outputs)[0]["generated_text"]
        ids = outputs["generated_ids"].reshape(-1, outputs["generated_ids"].shape[-1])[0]
        return {
            "report": report,
            "ids": ids,
            "pixel_values": model_inputs["pixel_values"],
            "view_mask": model_inputs.get("view_mask"),
        }

    @torch.inference_mode()
    def attention_maps(
        self, pixel_values: torch.Tensor, view_mask: torch.Tensor | None, ids: torch.Tensor
    ) -> np.ndarray:
        """
        Where the report's tokens attended in the image.

        Re-reads `[image prefix; bos; report tokens]` with `output_attentions=True` and averages, over layers,
        heads and the positions that produced each report token, the attention paid to each image-prefix
        position; the result is reshaped to each view's feature grid.

        Returns:
            `np.ndarray` of shape `(views, side, side)`, min-max scaled to [0, 1] over the present views
            (absent views stay 0).
        """
        model = self.load().model
        device = model.device
        config = model.config
        keep = ids
        if config.pad_token_id is not None:
            keep = keep[keep != config.pad_token_id]
        eos = config.eos_token_id
        if eos is not None and (keep == eos).any():  # stop at (and include) the first eos
            keep = keep[: int((keep == eos).nonzero()[0]) + 1]
        bos = torch.tensor([config.bos_token_id], dtype=torch.long)
        input_ids = torch.cat([bos, keep.cpu()])[None].to(device)
        outputs = model(
            pixel_values=pixel_values.to(device, model.dtype),
            view_mask=None if view_mask is None else view_mask.to(device),
            input_ids=input_ids,
            output_attentions=True,
        )
        if not outputs.attentions or outputs.attentions[0] is None:
            raise RuntimeError(
                "the decoder returned no attention weights (load it with attn_implementation='eager')."
            )
        prefix = int(outputs.prefix_length)
        produced = max(1, keep.numel())  # query rows: bos .. last-but-one report token
        stacked = torch.stack([layer[0] for layer in outputs.attentions])  # (layers, heads, L, L)
        to_prefix = (
            stacked[:, :, prefix : prefix + produced, :prefix].float().mean(dim=(0, 1, 2))
        )  # (prefix,)
        views = pixel_values.shape[1] if pixel_values.ndim == 5 else 1
        per_view = to_prefix.reshape(views, -1)
        side = int(round(per_view.shape[1] ** 0.5))
        if side * side != per_view.shape[1]:
            raise RuntimeError(f"{per_view.shape[1]} image tokens per view do not form a square grid.")
        maps = per_view.reshape(views, side, side).cpu().numpy()
        present = np.ones(views, dtype=bool) if view_mask is None else view_mask[0].bool().cpu().numpy()
        low, high = maps[present].min(), maps[present].max()
        scaled = np.zeros_like(maps)
        if high > low:  # min-max over the present views: the picture shows where attention was highest
            scaled[present] = (maps[present] - low) / (high - low)
        return scaled


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """
    Blend a [0, 1] heat map (upsampled, jet colours) over a grayscale copy of `image`.

    The image is centre-cropped to a square first, as the processor does, so the map's cells line up with
    the part of the film the model saw.
    """
    from matplotlib import colormaps

    gray = image.convert("L")
    side = min(gray.size)
    left, top = (gray.width - side) // 2, (gray.height - side) // 2
    gray = gray.crop((left, top, left + side, top + side))
    base = gray.resize((OVERLAY_SIDE, OVERLAY_SIDE), Image.Resampling.BILINEAR).convert("RGB")
    heat_img = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(
        (OVERLAY_SIDE, OVERLAY_SIDE), Image.Resampling.BICUBIC
    )
    colored = (colormaps["jet"](np.asarray(heat_img) / 255.0)[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(colored), alpha)


def findings_rows(report: str) -> list[list[str]]:
    """The labeler's reading of `report` as table rows [observation, finding]."""
    from xraycap.radiology_report.labeler import label_reports

    labels = label_reports([report])[0]
    return [
        [name, _FINDING_WORDS.get(labels.get(name), str(labels.get(name)))] for name in CHEXPERT_OBSERVATIONS
    ]


def _open_image(value: Any) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    from processing_xraycap import load_image

    return load_image(value)


def caption_study(
    captioner: Captioner, frontal: Any, lateral: Any = None, num_beams: int = 1
) -> tuple[str, list[list[str]], Image.Image | None]:
    """
    What the button does: the report, the findings table and (grid models) the attention picture.

    Args:
        captioner (`Captioner`): the loaded model.
        frontal: the frontal film (a path as Gradio hands it, or a PIL image); required.
        lateral (*optional*): the lateral film.
        num_beams (`int`): beam width.

    Returns:
        `(report, findings rows, heat-map picture or None)`.
    """
    if frontal is None:
        raise gr.Error("Upload a frontal chest X-ray first.")
    try:
        views = [_open_image(frontal)] + ([_open_image(lateral)] if lateral is not None else [])
        model = captioner.load().model
    except (OSError, ValueError) as error:
        raise gr.Error(str(error)) from error
    if len(views) > model.config.max_views:
        gr.Warning(f"This model reads {model.config.max_views} view(s): the lateral is ignored.")
        views = views[: model.config.max_views]
    result = captioner.generate(views, num_beams=int(num_beams))
    rows = findings_rows(result["report"])
    heat_picture = None
    if model.config.visual_tokens == "grid":
        maps = captioner.attention_maps(result["pixel_values"], result["view_mask"], result["ids"])
        panels = [overlay(view, heat) for view, heat in zip(views, maps)]
        heat_picture = Image.new("RGB", (OVERLAY_SIDE * len(panels), OVERLAY_SIDE))
        for i, panel in enumerate(panels):
            heat_picture.paste(panel, (i * OVERLAY_SIDE, 0))
    return result["report"], rows, heat_picture


def build_demo(model_dir: str | None = None, options: ModelOptions | None = None) -> gr.Blocks:
    """
    Build the Gradio Blocks for a model (loaded on the first request).

    Args:
        model_dir (`str`, *optional*): the model; defaults to `options.model`.
        options (`ModelOptions`, *optional*): defaults to `resolve_model_options()` (the environment).

    Returns:
        `gr.Blocks`
    """
    options = options or resolve_model_options()
    captioner = Captioner(
        model_dir or options.model, trust_remote_code=options.trust_remote_code, revision=options.revision
    )
    warning = training_data_warning(captioner.model_dir, captioner.revision)

    def run(frontal, lateral, num_beams):
        return caption_study(captioner, frontal, lateral, num_beams)

    blocks_kwargs = {} if _THEME_AT_LAUNCH else {"theme": THEME}
    with gr.Blocks(title="XrayCap: chest X-ray report generation", **blocks_kwargs) as demo:
        gr.Markdown(
            "# XrayCap: chest X-ray → radiology report\n"
            "ResNet image encoder → projection → image prefix → GPT-2 decoder. Upload a frontal view "
            "(and the lateral, if you have it) and press **Write report**.\n\n"
            f"Model: `{captioner.model_dir}`. *A research demo: not for clinical use.*"
        )
        with gr.Row():
            with gr.Column():
                # image_mode=None: the file as uploaded (a 16-bit film stays 16-bit; the processor reads it).
                frontal = gr.Image(
                    type="filepath", image_mode=None, label="Frontal view", elem_id="frontal", height=300
                )
                lateral = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="Lateral view (optional)",
                    elem_id="lateral",
                    height=300,
                )
                num_beams = gr.Slider(
                    1, 8, value=1, step=1, label="Number of beams (1 = greedy)", elem_id="beams"
                )
                button = gr.Button("Write report", variant="primary", elem_id="run")
            with gr.Column():
                if warning:
                    gr.Markdown(f"**Warning: {warning}**", elem_id="training-data-warning")
                report = gr.Textbox(label="Report", lines=6, elem_id="report", interactive=False)
                findings = gr.Dataframe(
                    headers=["Observation", "Finding"],
                    label="Findings (CheXpert-style labeler on the report)",
                    elem_id="findings",
                    interactive=False,
                )
                heat = gr.Image(
                    label="Where the report's tokens attended (grid models)",
                    elem_id="heatmap",
                    interactive=False,
                    height=OVERLAY_SIDE + 40,
                )
        button.click(
            run, inputs=[frontal, lateral, num_beams], outputs=[report, findings, heat], api_name="caption"
        )
    return demo


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None) -> None:
    """Serve `demo` on `host:port` (Gradio's defaults when None), each upload at most `MAX_FILE_SIZE`."""
    launch_kwargs = {"theme": THEME} if _THEME_AT_LAUNCH else {}
    demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, **launch_kwargs)


demo = build_demo(options=resolve_model_options(sys.argv[1:] if __name__ == "__main__" else None))


if __name__ == "__main__":
    cli_args = build_parser().parse_args()
    launch(demo, cli_args.host, cli_args.port)
