#!/usr/bin/env python
"""Train, evaluate, save and push an XrayCap radiology report generator with Accelerate.

With no arguments (`accelerate launch run_captioning.py`, or plain `python run_captioning.py`) it synthesizes
phantom chest X-ray studies, builds them into an Arrow dataset, trains the `tiny` preset on the CPU, evaluates
it on the test split beside two floors (every image mid-grey; each study given the report of its nearest
training study) and writes a loadable model folder to `outputs/xraycap-demo/`.

The same script trains the real model on the Indiana University data, one command per config in `configs/`:

    accelerate launch run_captioning.py configs/iu_r2gen.yaml [--data_dir /path/to/kaggle_copy --download false]

Arguments come from the command line, or from a YAML / JSON file followed by overriding arguments (the
dataclasses are in `training/arguments.py`). `--num_seeds` / `--folds` repeat the run and summarize the runs.
The script follows transformers' `examples/pytorch/*_no_trainer.py`; its helpers live in the `training` package.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import evaluate
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from pipeline_xraycap import add_pipeline_to_folder
from training.arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    hub_upload_extra,
    is_repeated,
    parse_args,
)
from training.augmentation import XrayAugmentation
from training.checkpoints import load_checkpoint, nonfinite_parameters, resolve_checkpoint, save_checkpoint
from training.data import (
    StudyCollator,
    cache_root,
    dataloader_workers,
    load_studies,
    model_inputs,
    run_splits,
    study_dataloader,
)
from training.distributed import build_accelerator
from training.evaluation import generate_reports, nearest_train_floor, score, write_predictions, write_samples
from training.feature_cache import FeatureCache, with_features
from training.figures import plot_training_curves
from training.hub import push_to_hub
from training.model_card import CARD_METRICS, add_card_section, build_model_card, describe_run, format_value
from training.models import build_config, build_model, build_processor, sync_batchnorm
from training.nonfinite import NonFiniteSteps, skip_nonfinite_update
from training.optimization import build_optimizer, training_loss
from training.precision import resolve_mixed_precision
from training.repeats import run_plan, summarize, summary_table
from training.step_log import StepLog, new_history

logger = get_logger(__name__)

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "radiology_report"
# Validation scores kept per epoch (for training_curves.png); METEOR and BERTScore are left to the test split.
CURVE_METRICS = ("bleu_1", "bleu_4", "rouge_l", "cider", "ce_micro_f1", "ce_macro_f1", "ce_example_f1")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, train_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if is_repeated(data_args, train_args):
        return train_repeated(model_args, data_args, train_args)
    return train(model_args, data_args, train_args)


def train_repeated(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments
) -> dict[str, Any]:
    """`--num_seeds` / `--folds`: one run per seed and fold in OUTPUT_DIR/<run>/, all on the same split, then
    every metric's mean and std in OUTPUT_DIR/eval_summary.json and in each run's model card."""
    state = PartialState()
    output_dir = Path(train_args.output_dir)
    split_seed = train_args.seed if data_args.split_seed is None else data_args.split_seed
    runs = []
    for run in run_plan(train_args.seed, train_args.num_seeds, data_args.folds, data_args.fold):
        logger.info(f"Run {run['name']}: seed {run['seed']}, fold {run['fold']}")
        run_dir = output_dir / run["name"]
        results = train(
            model_args,
            replace(data_args, split_seed=split_seed, fold=run["fold"]),
            replace(train_args, seed=run["seed"], num_seeds=1, output_dir=str(run_dir)),
        )
        runs.append({**run, "output_dir": str(run_dir), "results": results})
    if not state.is_main_process:
        return {}
    summary = summarize(runs)
    (output_dir / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    table = summary_table(summary, CARD_METRICS)
    for run in runs:
        add_card_section(Path(run["output_dir"]) / "README.md", "Across runs", table)
    if stats := summary["summary"].get("test", {}).get("ce_macro_f1"):
        logger.info(
            f"test ce_macro_f1 over {stats['n']} runs: {stats['mean']:.3f} ± {stats['std']:.3f} (summary in "
            f"{output_dir / 'eval_summary.json'})"
        )
    return summary


def train(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments
) -> dict[str, Any]:
    """One run: train, save the model folder, evaluate on test (with the grey and nearest-train floors)."""
    start_time = time.perf_counter()
    output_dir = Path(train_args.output_dir)

    # Accelerator: autocast over fp32 weights in the precision this hardware runs well (training/distributed.py).
    mixed_precision = resolve_mixed_precision(train_args.mixed_precision)
    accelerator = build_accelerator(model_args, train_args, mixed_precision, str(output_dir / "runs"))
    set_seed(train_args.seed)
    if accelerator.is_main_process:
        stale = output_dir / "checkpoints"
        if train_args.overwrite_output_dir and train_args.resume_from_checkpoint is None and stale.is_dir():
            logger.warning(f"--overwrite_output_dir: deleting the older run's checkpoints in {stale}")
            shutil.rmtree(stale)
        output_dir.mkdir(parents=True, exist_ok=True)
        run_args = {"model": asdict(model_args), "data": asdict(data_args), "training": asdict(train_args)}
        run_args["training"]["mixed_precision_resolved"] = mixed_precision
        (output_dir / "run_args.json").write_text(json.dumps(run_args, indent=2))
    accelerator.wait_for_everyone()

    # Data, processor, model.
    synthetic = not (data_args.data_dir or data_args.dataset_dir or data_args.download)
    config = build_config(model_args, synthetic_default=synthetic and data_args.views is None)
    views = data_args.views or ("frontal" if config.max_views == 1 else "pair")
    split_seed = train_args.seed if data_args.split_seed is None else data_args.split_seed
    dataset, build_report = load_studies(data_args, views, split_seed, accelerator)
    train_split, val_split, test_split = run_splits(dataset, data_args, split_seed)
    if data_args.fold is not None:
        logger.info(
            f"fold {data_args.fold} of {data_args.folds}: {len(train_split)} train, {len(val_split)} validation"
        )
    processor = build_processor(model_args, config, train_split["report"])
    set_seed(train_args.seed)
    model = build_model(model_args, config, processor)
    # channels_last: faster convolutions (oneDNN / cuDNN), same math.
    model.vision_model.to(memory_format=torch.channels_last)
    sync_batchnorm(model, accelerator)  # a trained BatchNorm tower on several GPUs: batch statistics over all
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Model: {n_params / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable")

    # Dataloaders (each with its own seeded generator: creating an iterator never draws from the global RNG).
    # --augment: the training images only, drawn anew each epoch (keyed on seed, epoch, row, view).
    augmentation = XrayAugmentation(seed=train_args.seed) if train_args.augment else None
    collator = StudyCollator(
        processor, config.max_views, data_args.max_target_length, augmentation=augmentation
    )
    eval_collator = StudyCollator(processor, config.max_views, data_args.max_target_length, with_text=False)
    eval_batch = train_args.per_device_eval_batch_size
    workers = dataloader_workers(data_args.dataloader_num_workers, accelerator.num_processes)
    pin = accelerator.device.type == "cuda"  # pinned batches: non-blocking copies to the GPU
    features = FeatureCache(
        cache_root(data_args) / "feature_cache", accelerator, eval_collator, eval_batch, workers
    )
    if train_args.cache_features and train_args.augment:
        logger.warning(
            "--cache_features is off: --augment changes the training images every epoch, so their encoder "
            "features cannot be computed once; the frozen encoder runs on every batch instead."
        )
    elif train_args.cache_features:  # the built splits carry their features (on disk) instead of their images
        for name in ("train", "validation"):
            dataset[name] = with_features(dataset[name], features.features(model, dataset[name], desc=name))
        train_split, val_split, _ = run_splits(dataset, data_args, split_seed)
    train_dataloader = study_dataloader(
        train_split,
        collator,
        train_args.per_device_train_batch_size,
        shuffle=True,
        num_workers=workers,
        seed=train_args.seed,
        pin_memory=pin,
    )
    val_dataloader = study_dataloader(
        val_split, eval_collator, eval_batch, num_workers=workers, pin_memory=pin
    )

    # Optimizer and schedule; the prepared scheduler steps once per process, so its steps are scaled.
    optimizer = build_optimizer(model, train_args.learning_rate, train_args.weight_decay, accelerator.device)
    batches_per_epoch = math.ceil(
        len(train_split) / (train_args.per_device_train_batch_size * accelerator.num_processes)
    )
    steps_per_epoch = math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps)
    max_steps = (
        train_args.max_steps if train_args.max_steps > 0 else train_args.num_train_epochs * steps_per_epoch
    )
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        math.ceil(train_args.warmup_ratio * max_steps) * accelerator.num_processes,
        max_steps * accelerator.num_processes,
    )

    model, optimizer, train_dataloader, val_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, val_dataloader, scheduler
    )
    if train_args.report_to != "none":
        tracked = {k: v for k, v in asdict(train_args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("xraycap", config=tracked)

    # Resume: restore model / optimizer / scheduler / RNG states, then skip the batches already consumed.
    # What a resume depends on; stored in every checkpoint and compared on resume.
    resume_arguments = {
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "max_steps": max_steps,
        "train_examples": len(train_split),
        "steps_per_epoch": steps_per_epoch,
        "seed": train_args.seed,
        "mixed_precision": mixed_precision,
    }
    history, completed_steps, starting_epoch, skip_batches = new_history(), 0, 0, 0
    checkpoint = resolve_checkpoint(train_args.resume_from_checkpoint, output_dir / "checkpoints")
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, resume_arguments)
        completed_steps, history = state["completed_steps"], new_history(state["history"])
        starting_epoch = completed_steps // steps_per_epoch
        skip_batches = (completed_steps % steps_per_epoch) * train_args.gradient_accumulation_steps
        if completed_steps >= max_steps:
            logger.info(
                f"{checkpoint} already holds all {max_steps} steps: no training, only saving and evaluation."
            )

    def checkpoint_now() -> None:
        log_steps()
        if bad := nonfinite_parameters(model):  # the step skip keeps weights finite; never save broken ones
            raise RuntimeError(
                f"Not saving step {completed_steps}: non-finite weights in {bad[:3]}. Resume from the last "
                "checkpoint (--resume_from_checkpoint latest) with a lower --learning_rate."
            )
        state = {"completed_steps": completed_steps, "history": history, "resume_arguments": resume_arguments}
        save_checkpoint(
            accelerator, output_dir / "checkpoints", completed_steps, state, train_args.save_total_limit
        )

    metric = evaluate.load(str(METRIC_PATH)) if train_args.do_eval else None
    generation = {"num_beams": train_args.num_beams, "max_new_tokens": train_args.max_new_tokens}

    # Training loop.
    train_start = time.perf_counter()
    progress = tqdm(
        total=max_steps,
        initial=completed_steps,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    steps = StepLog(
        accelerator, NonFiniteSteps(train_args.max_nonfinite_steps, output_dir / "checkpoints"), history
    )

    def log_steps() -> None:  # the losses and gradient norms wait on the device until here: no sync per step
        if (last := steps.flush()) is not None:
            progress.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}", epoch=epoch)
            if train_args.report_to != "none":
                accelerator.log({"train/loss": last["loss"], "train/lr": last["lr"]}, step=completed_steps)

    last_epoch = num_epochs if train_args.do_train and completed_steps < max_steps else starting_epoch
    for epoch in range(starting_epoch, last_epoch):
        train_dataloader.set_epoch(epoch)
        collator.set_epoch(epoch)  # a new draw of the augmented images (--augment)
        batches = train_dataloader
        if epoch == starting_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = training_loss(model, model_inputs(batch))
                accelerator.backward(loss)
                steps.add_loss(loss)
                update = True
                if accelerator.sync_gradients:  # the synced gradients' norm is the same on every process
                    max_norm = train_args.max_grad_norm if train_args.max_grad_norm > 0 else math.inf
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    # A NaN / inf gradient updates no weight (fp16's GradScaler skips it itself).
                    update = skip_nonfinite_update(optimizer, grad_norm, accelerator.scaler)
                if update:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            steps.end_step(completed_steps, grad_norm, scheduler.get_last_lr()[0])
            progress.update(1)
            if completed_steps % train_args.logging_steps == 0:
                log_steps()
            if train_args.save_steps and completed_steps % train_args.save_steps == 0:
                checkpoint_now()
            if completed_steps >= max_steps:
                break
        epoch_done = completed_steps % steps_per_epoch == 0 or completed_steps >= max_steps
        if epoch_done and not (train_args.save_steps and completed_steps % train_args.save_steps == 0):
            checkpoint_now()
        if metric is not None and len(val_split):
            with accelerator.autocast():
                reports = generate_reports(
                    model, val_dataloader, processor, accelerator, f"validation, epoch {epoch}", **generation
                )
            if accelerator.is_main_process:
                val_metrics = score(metric, val_split, reports, bertscore=False, meteor=False)
                curves = {key: val_metrics[key] for key in CURVE_METRICS if val_metrics.get(key) is not None}
                history["epoch_metrics"].append({"epoch": epoch, "step": completed_steps, **curves})
                logger.info(
                    f"epoch {epoch}: validation ce_macro_f1 {format_value(val_metrics.get('ce_macro_f1'))}, "
                    f"bleu_4 {format_value(val_metrics.get('bleu_4'))}"
                )
                if train_args.report_to != "none":
                    numbers = {
                        f"validation/{k}": v for k, v in val_metrics.items() if isinstance(v, (int, float))
                    }
                    accelerator.log(numbers, step=completed_steps)
        if completed_steps >= max_steps:
            break
    progress.close()
    train_time = time.perf_counter() - train_start

    # Save the model folder: weights (safetensors), config, code files, processor, pipeline. Training is over,
    # so the autocast wrapper comes off: test generation runs in fp32, as a reloaded model does.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False, keep_torch_compile=False)
    if bad := nonfinite_parameters(unwrapped):
        raise RuntimeError(
            f"Not saving the model to {output_dir}: non-finite weights in {bad[:3]}. Resume from the last "
            "checkpoint (--resume_from_checkpoint latest) with a lower --learning_rate."
        )
    if accelerator.is_main_process:
        unwrapped.config.register_for_auto_class()
        unwrapped.register_for_auto_class("AutoModel")
        processor.register_for_auto_class("AutoProcessor")
        unwrapped.save_pretrained(output_dir, safe_serialization=True)
        processor.save_pretrained(output_dir)
        add_pipeline_to_folder(output_dir)  # pipeline("image-to-text", model=output_dir, ...)

    # Evaluate on the test split, beside two floors: every image mid-grey, and the nearest train study's report.
    results: dict[str, Any] = {}
    if metric is not None:
        reports = {}
        for name, ablate in (("test", False), ("test_image_ablated", True)):
            test_collator = StudyCollator(
                processor, config.max_views, data_args.max_target_length, False, ablate
            )
            loader = accelerator.prepare(
                study_dataloader(test_split, test_collator, eval_batch, num_workers=workers, pin_memory=pin)
            )
            reports[name] = generate_reports(model, loader, processor, accelerator, name, **generation)
        reports["test_nearest_train"] = nearest_train_floor(
            model, train_split, test_split, features, output_dir / "floor_features"
        )
        if accelerator.is_main_process:
            for name, by_row in reports.items():
                results[name] = score(metric, test_split, by_row)
            if history["epoch_metrics"]:
                last = history["epoch_metrics"][-1]
                results["validation"] = {k: v for k, v in last.items() if k not in ("epoch", "step")}
            write_predictions(output_dir / "predictions.jsonl", test_split, reports)
            write_samples(output_dir, test_split, reports["test"])

    # Results, history, curves and the model card.
    if accelerator.is_main_process:
        results["run"] = {
            "wall_time_s": round(time.perf_counter() - start_time, 1),
            "train_time_s": round(train_time, 1),
            "optimizer_steps": completed_steps,
            "epochs": num_epochs,
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "mixed_precision": mixed_precision,
            "torch_compile": train_args.torch_compile,
            "num_examples": {
                "train": len(train_split),
                "validation": len(val_split),
                "test": len(test_split),
            },
            "final_train_loss": history["loss"][-1] if history["loss"] else None,
        }
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        (output_dir / "trainer_history.json").write_text(json.dumps(history))
        plot_training_curves(history, output_dir / "training_curves.png")
        run_info = describe_run(
            model_args, data_args, train_args, unwrapped, views, results, build_report, synthetic=synthetic
        )
        build_model_card(results, run_info).save(output_dir / "README.md")
        logger.info(f"Saved the model folder to {output_dir} in {results['run']['wall_time_s']} s")
        if "test" in results:
            test, grey = results["test"], results["test_image_ablated"]
            logger.info(
                f"test ce_macro_f1 {format_value(test.get('ce_macro_f1'))} (grey images: "
                f"{format_value(grey.get('ce_macro_f1'))}, nearest train report: "
                f"{format_value(results['test_nearest_train'].get('ce_macro_f1'))}), bleu_4 "
                f"{format_value(test.get('bleu_4'))}"
            )

    # The test set's generation was the last collective: scoring, writing and the Hub upload keep no process waiting.
    if train_args.report_to != "none":
        accelerator.end_training()
    if train_args.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(
            output_dir, train_args.hub_model_id, train_args.hub_private, extra=hub_upload_extra(train_args)
        )
        logger.info(f"Pushed to {url}")
    return results


if __name__ == "__main__":
    main()
