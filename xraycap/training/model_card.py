"""The model card (`README.md`) of a saved model folder, built with huggingface_hub's `ModelCard`.

The metadata (license, tags, pipeline tag, datasets, and the test scores as `model-index` eval results) is a
`ModelCardData`; the body describes the data and training, the results table with the grey-image ablation,
and the intended use and limits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from xraycap.radiology_report.clinical_efficacy import observation_key
from xraycap.radiology_report.labeler import CHEXPERT_OBSERVATIONS

from .models import vision_tower_is_frozen

# The metrics the card shows (eval_results.json has more).
CARD_METRICS = "bleu_1 bleu_4 meteor rouge_l cider bertscore_f1 ce_micro_f1 ce_macro_f1 ce_example_f1".split()
SYNTHETIC_DATASET = "synthetic-phantom-cxr"
INDIANA_DATASET = "raddar/chest-xrays-indiana-university"

_BODY = """
# {model_name}

A chest X-ray report generator: {architecture}. Trained with xraycap's `run_captioning.py`.

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("{model_name}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{model_name}", trust_remote_code=True)
inputs = processor(images=[image], return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs, num_beams=3, max_new_tokens=100), skip_special_tokens=True))
```

## Data

{data_description}

Examples per split: {num_examples}. Target section: `{section}`; views: `{views}`.
Splits are by study (uid), so no study's second view leaks into training.

## Training

{training_description}

## Results

Test split, beam search ({num_beams} beams), beside two floors. `test_image_ablated` feeds every test study a
constant mid-grey image: the gap to `test` is what the model reads from the image. `test_nearest_train` gives
each test study the report of the training study whose images are closest (cosine of the encoder's pooled
features): a model that beats neither floor has learned nothing worth reporting. Language metrics are corpus-level (R2Gen
protocol); `ce_*` are clinical efficacy scores from the rule-based CheXpert-style labeler
(`metrics/radiology_report`), with `ce_macro_f1` averaged over the observations positive in at least one
reference.

{table}

{observation_table}

## Intended use and limits

Research on radiology report generation only. **Not for clinical use**: not a medical device, not validated
on any population, and it will write fluent reports that can be wrong. Indiana University data are
CC BY-NC-ND 4.0 (non-commercial). A model trained on the synthetic phantom studies describes phantoms only.
"""


def format_value(value: Any) -> str:
    """A metric value as the card and the logs show it: floats to 3 decimals, None as n/a."""
    return f"{value:.3f}" if isinstance(value, float) else ("n/a" if value is None else str(value))


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per metric of `CARD_METRICS`, one column per split of `results`."""
    splits = [s for s in ("test", "test_image_ablated", "test_nearest_train", "validation") if s in results]
    lines = ["| metric | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for key in CARD_METRICS:
        if any(key in results[s] for s in splits):
            lines.append(f"| {key} | " + " | ".join(format_value(results[s].get(key)) for s in splits) + " |")
    return "\n".join(lines)


def observation_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the clinical efficacy F1 per CheXpert observation: test beside both floors.

    One row per observation positive in at least one test reference (those `ce_macro_f1` averages), with its
    test support; "" when the results hold no per-observation scores.
    """
    test = results.get("test", {})
    splits = [s for s in ("test", "test_image_ablated", "test_nearest_train") if s in results]
    rows = []
    for observation in CHEXPERT_OBSERVATIONS:
        key = observation_key(observation)
        support = test.get(f"ce_support_{key}")
        if isinstance(support, (int, float)) and support > 0:
            values = " | ".join(format_value(results[s].get(f"ce_f1_{key}")) for s in splits)
            rows.append(f"| {observation} | {int(support)} | {values} |")
    if not rows:
        return ""
    header = "| observation (F1) | test support | " + " | ".join(splits) + " |"
    return "\n".join([header, "|---" * (len(splits) + 2) + "|", *rows])


def build_model_card(results: dict[str, dict[str, Any]], run_info: dict[str, Any]) -> ModelCard:
    """The model card of a trained model.

    Args:
        results (`dict[str, dict[str, Any]]`):
            `eval_results.json`'s content: `{"test": {metric: value}, "test_image_ablated": {...}, ...}`. The
            test scores go into the `model-index` metadata; every split goes into the body's table.
        run_info (`dict[str, Any]`):
            The facts of the run, as [`describe_run`] returns them.

    Returns:
        `ModelCard`: save it with `card.save(folder / "README.md")`, read it back with `ModelCard.load`.
    """
    eval_results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Radiology report generation",
            dataset_type=run_info["dataset_id"],
            dataset_name=run_info["dataset_name"],
            dataset_split="test",
            metric_type=key,
            metric_name=key,
            metric_value=float(results["test"][key]),
        )
        for key in CARD_METRICS
        if isinstance(results.get("test", {}).get(key), float)
    ]
    card_data = ModelCardData(
        model_name=run_info["model_name"],
        license="cc-by-nc-nd-4.0",
        library_name="transformers",
        pipeline_tag="image-to-text",
        tags=["radiology-report-generation", "chest-x-ray", "image-captioning", "medical"],
        datasets=None if run_info["dataset_id"] == SYNTHETIC_DATASET else [run_info["dataset_id"]],
        base_model=run_info.get("base_model") or None,
        metrics=["bleu", "meteor", "rouge", "cider", "bertscore"],
        eval_results=eval_results or None,
    )
    body = _BODY.format(
        **run_info, table=metrics_table(results), observation_table=observation_table(results)
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def describe_run(
    model_args, data_args, train_args, model, views: str, results: dict, build_report: dict, synthetic: bool
) -> dict[str, Any]:
    """The facts [`build_model_card`] fills in, from run_captioning's arguments, model and results.

    Args:
        model_args, data_args, train_args:
            run_captioning's argument dataclasses (`ModelArguments`, `DataArguments`, `TrainingArguments`).
        model (`XrayCapForConditionalGeneration`):
            The trained model (its config describes the architecture).
        views (`str`):
            The views used (`"frontal"`, `"pair"` or `"all"`).
        results (`dict`):
            `eval_results.json`'s content (its `"run"` entry gives steps, time, device).
        build_report (`dict`):
            The dataset build report (skipped rows are counted).
        synthetic (`bool`):
            Trained on the embedded synthetic phantom studies.
    """
    config = model.config
    vision = model_args.vision_model or f"a ResNet built from the `{model_args.preset}` preset (random init)"
    text = model_args.text_model or f"a GPT-2 built from the `{model_args.preset}` preset (random init)"
    run = results.get("run", {})
    novelty = build_report.get("finding_sets") or {}
    unseen = (
        f" {novelty['test_unseen_in_train']:.0%} of the test studies show a set of findings (with their sides, "
        "sizes and locations) that no training study shows"
        if synthetic and "test_unseen_in_train" in novelty
        else ""
    )
    if unseen and "test_headings_unseen_in_train" in novelty:
        unseen += (
            f" ({novelty['test_headings_unseen_in_train']:.0%} counting only which observations they name, "
            "as the clinical efficacy scores do)"
        )
    unseen += "." if unseen else ""
    return {
        "model_name": Path(train_args.hub_model_id or train_args.output_dir).name,
        "dataset_id": SYNTHETIC_DATASET if synthetic else INDIANA_DATASET,
        "dataset_name": "Synthetic phantom chest X-rays" if synthetic else "Indiana University chest X-rays",
        "base_model": [name for name in (model_args.vision_model, model_args.text_model) if name],
        "architecture": f"{vision} -> {config.projection} projection -> {config.visual_tokens} visual tokens "
        f"({model.tokens_per_view} per view, up to {config.max_views} view(s)) -> {text}",
        "data_description": (
            f"{data_args.synthetic_studies} synthetic phantom chest radiograph studies from `python -m "
            "dataset_builder synthesize` (findings drawn into the image; the report is determined by what is drawn)."
            + unseen
            if synthetic
            else "Indiana University chest X-ray collection (Open-i; Kaggle copy raddar/chest-xrays-indiana-university), "
            f"built with `python -m dataset_builder build`; {len(build_report.get('skipped', []))} input rows "
            "skipped (reasons in build_report.json)."
        ),
        "num_examples": run.get("num_examples"),
        "section": data_args.section,
        "views": views,
        "num_beams": train_args.num_beams,
        "training_description": (
            f"AdamW (lr {train_args.learning_rate}, weight decay {train_args.weight_decay}), cosine schedule with "
            f"{train_args.warmup_ratio:.0%} warmup, batch {train_args.per_device_train_batch_size} x "
            f"{run.get('num_processes', 1)} process(es) x {train_args.gradient_accumulation_steps} accumulation, "
            f"{run.get('optimizer_steps')} steps ({run.get('epochs')} epochs), mixed precision "
            f"{run.get('mixed_precision')}, encoder {'frozen' if vision_tower_is_frozen(model) else 'trained'}, "
            f"seed {train_args.seed}, on {run.get('device')} in {run.get('train_time_s')} s of training "
            f"({run.get('wall_time_s')} s for the whole run)."
        ),
    }


def add_card_section(card_path: Path, title: str, text: str) -> None:
    """Appends a `## title` section to the model card saved at `card_path` (metadata kept as it is).

    Args:
        card_path (`Path`): a folder's `README.md` written by [`build_model_card`].
        title (`str`): the section's heading.
        text (`str`): its Markdown body.
    """
    card = ModelCard.load(card_path)
    card.text = f"{card.text.rstrip()}\n\n## {title}\n\n{text}\n"
    card.save(card_path)
