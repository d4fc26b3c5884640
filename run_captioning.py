#!/usr/bin/env python
"""Train, evaluate, save and push an XrayCap radiology report generator with Accelerate.

With no arguments (`accelerate launch run_captioning.py`, or plain `python run_captioning.py`) it synthesizes
phantom chest X-ray studies, builds them into an Arrow dataset, trains the `tiny` preset on the CPU, evaluates
it on the test split beside two floors (every image mid-grey; each study given the report of its nearest
training study) and writes a loadable model folder to `outputs/xraycap-demo/`.

The same script trains the real model on the Indiana University data, one command per config in `configs/`:

    accelerate launch run_captioning.py configs/iu_r2gen.yaml [--data_dir /path/to/kaggle_copy --download false]

Arguments come from the command line, or from a YAML / JSON file followed by overriding arguments (the
dataclasses are in `xraycap/training/arguments.py`). `--num_seeds` / `--folds` repeat the run and summarize the runs.
The script follows transformers' `examples/pytorch/*_no_trainer.py`; its helpers live in the `xraycap.training` package.
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
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from pipeline_xraycap import add_pipeline_to_folder
from xraycap.training.arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    hub_upload_extra,
    is_repeated,
    parse_args,
)
from xraycap.training.checkpoints import (
    load_checkpoint,
    nonfinite_parameters,
    resolve_checkpoint,
    save_checkpoint,
)
from xraycap.training.data import load_studies, make_dataloaders, run_splits
from xraycap.training.distributed import build_accelerator, resolve_mixed_precision
from xraycap.training.evaluation import evaluate_test, evaluate_validation
from xraycap.training.figures import plot_training_curves
from xraycap.training.hub import push_to_hub
from xraycap.training.model_card import (
    CARD_METRICS,
    add_card_section,
    build_model_card,
    describe_run,
    format_value,
)
from xraycap.training.models import build_config, build_model, build_processor, sync_batchnorm
from xraycap.training.optimization import (
    NonFiniteSteps,
    StepLog,
    build_optimizer,
    new_history,
    skip_nonfinite_update,
)
from xraycap.training.repeats import run_plan, summarize, summary_table

logger = get_logger(__name__)

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "radiology_report"


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


def prepare_output_dir(
    output_dir: Path,
    accelerator: Accelerator,
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainingArguments,
    mixed_precision: str,
) -> None:
    """The main process creates the output folder, deletes an older run's checkpoints there (`--overwrite_output_dir`
    without a resume) and writes the run's arguments to `run_args.json`; the others wait for it."""
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


def save_model_folder(
    model: torch.nn.Module, processor: Any, accelerator: Accelerator, output_dir: Path
) -> torch.nn.Module:
    """Saves the model folder (main process): weights (safetensors), config, code files, processor, pipeline, with
    the classes registered for `trust_remote_code`. Refuses non-finite weights. Returns the unwrapped model, its
    autocast wrapper removed: training is over, and generation from here runs in fp32, as a reloaded model does."""
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
    return unwrapped


def run_length(train_args: TrainingArguments, num_examples: int, num_processes: int) -> tuple[int, int, int]:
    """The run's optimizer steps per epoch, its optimizer steps (`--max_steps`, else `--num_train_epochs` epochs)
    and its epochs (the last one maybe cut short)."""
    batches_per_epoch = math.ceil(num_examples / (train_args.per_device_train_batch_size * num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps)
    max_steps = (
        train_args.max_steps if train_args.max_steps > 0 else train_args.num_train_epochs * steps_per_epoch
    )
    return steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch)


def resume(
    accelerator: Accelerator, train_args: TrainingArguments, root: Path, resume_arguments: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """`--resume_from_checkpoint`: the checkpoint's states restored into the prepared objects (after its
    `resume_arguments` are checked against the run's); returns the optimizer steps done and the history so far
    (0 and an empty history without a checkpoint)."""
    checkpoint = resolve_checkpoint(train_args.resume_from_checkpoint, root)
    if checkpoint is None:
        return 0, new_history()
    state = load_checkpoint(accelerator, checkpoint, resume_arguments)
    if state["completed_steps"] >= resume_arguments["max_steps"]:
        logger.info(
            f"{checkpoint} already holds all {resume_arguments['max_steps']} steps: no training, only saving and "
            "evaluation."
        )
    return state["completed_steps"], new_history(state["history"])


def save_results(
    output_dir: Path, results: dict[str, Any], history: dict[str, Any], run_info: dict[str, Any]
) -> None:
    """Writes `eval_results.json`, `trainer_history.json`, `training_curves.png` and the model card (`README.md`),
    and logs the test scores beside the two floors (main process)."""
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "trainer_history.json").write_text(json.dumps(history))
    plot_training_curves(history, output_dir / "training_curves.png")
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


def train_epoch(
    dataloader: DataLoader,
    epoch: int,
    completed_steps: int,
    skip_batches: int = 0,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    steps: StepLog,
    train_args: TrainingArguments,
    max_steps: int,
    steps_per_epoch: int,
    resume_arguments: dict[str, Any],
) -> int:
    """One epoch of optimizer steps, or fewer where `max_steps` comes first; a checkpoint every `--save_steps` and
    at the epoch's end. The losses and gradient norms stay on the device until `--logging_steps` ([`StepLog`]).

    Args:
        dataloader (`DataLoader`): the prepared training loader.
        epoch (`int`): this epoch.
        completed_steps (`int`): the optimizer steps done before it.
        skip_batches (`int`, *optional*, defaults to 0): batches of this epoch a resumed run already trained on.
        model, optimizer, scheduler, accelerator: the prepared training objects.
        steps (`StepLog`): records each optimizer step (and holds the run's history).
        train_args (`TrainingArguments`): `max_grad_norm`, `logging_steps`, `save_steps`, `save_total_limit`,
            `output_dir`.
        max_steps (`int`), steps_per_epoch (`int`): the run's length.
        resume_arguments (`dict[str, Any]`): what a resume depends on, stored in every checkpoint.

    Returns:
        `int`: the optimizer steps done after it.
    """
    dataloader.set_epoch(epoch)
    dataloader.collate_fn.set_epoch(epoch)  # a new draw of the augmented images (--augment)
    batches = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
    max_norm = train_args.max_grad_norm if train_args.max_grad_norm > 0 else math.inf

    def checkpoint() -> None:
        steps.report(completed_steps, epoch)
        if bad := nonfinite_parameters(model):  # the step skip keeps weights finite; never save broken ones
            raise RuntimeError(
                f"Not saving step {completed_steps}: non-finite weights in {bad[:3]}. Resume from the last "
                "checkpoint (--resume_from_checkpoint latest) with a lower --learning_rate."
            )
        state = {
            "completed_steps": completed_steps,
            "history": steps.history,
            "resume_arguments": resume_arguments,
        }
        root = Path(train_args.output_dir) / "checkpoints"
        save_checkpoint(accelerator, root, completed_steps, state, train_args.save_total_limit)

    for batch in batches:
        with accelerator.accumulate(model):
            inputs = {k: v for k, v in batch.items() if k != "index"}
            # Logits only where the loss looks: the report positions and the last prefix position (it predicts the
            # first report token); the loss of the full forward without prefix_length x vocab_size logits per study.
            loss = model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] + 1).loss
            accelerator.backward(loss)
            steps.add_loss(loss)
            update = True
            if accelerator.sync_gradients:  # the synced gradients' norm is the same on every process
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
        steps.progress.update(1)
        if completed_steps % train_args.logging_steps == 0:
            steps.report(completed_steps, epoch)
        if train_args.save_steps and completed_steps % train_args.save_steps == 0:
            checkpoint()
        if completed_steps >= max_steps:
            break
    epoch_done = completed_steps % steps_per_epoch == 0 or completed_steps >= max_steps
    if epoch_done and not (train_args.save_steps and completed_steps % train_args.save_steps == 0):
        checkpoint()
    return completed_steps


def train(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments
) -> dict[str, Any]:
    """One run: train, save the model folder, evaluate on test (with the grey and nearest-train floors)."""
    start_time = time.perf_counter()
    output_dir = Path(train_args.output_dir)
    report = train_args.report_to != "none"

    # Prepare: the Accelerator (autocast over fp32 weights in the precision this hardware runs well), the output
    # folder, the studies and the run's splits, the processor and model, every split's dataloader.
    mixed_precision = resolve_mixed_precision(train_args.mixed_precision)
    accelerator = build_accelerator(model_args, train_args, mixed_precision, str(output_dir / "runs"))
    set_seed(train_args.seed)
    prepare_output_dir(output_dir, accelerator, model_args, data_args, train_args, mixed_precision)
    synthetic = not (data_args.data_dir or data_args.dataset_dir or data_args.download)
    config = build_config(model_args, synthetic_default=synthetic and data_args.views is None)
    views = data_args.views or ("frontal" if config.max_views == 1 else "pair")
    split_seed = train_args.seed if data_args.split_seed is None else data_args.split_seed
    dataset, build_report = load_studies(data_args, views, split_seed, accelerator)
    train_split = run_splits(dataset, data_args, split_seed)[0]
    processor = build_processor(model_args, config, train_split["report"])
    set_seed(train_args.seed)
    model = build_model(model_args, config, processor)
    # channels_last: faster convolutions (oneDNN / cuDNN), same math.
    model.vision_model.to(memory_format=torch.channels_last)
    sync_batchnorm(model, accelerator)  # a trained BatchNorm tower on several GPUs: batch statistics over all
    n_params, n_trainable = model.num_parameters(), model.num_parameters(only_trainable=True)
    logger.info(f"Model: {n_params / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable")
    loaders, splits, features = make_dataloaders(
        dataset, processor, model, accelerator, data_args, train_args, config.max_views, split_seed
    )

    # The optimizer and the schedule; the prepared scheduler steps once per process, so its steps are scaled.
    optimizer = build_optimizer(model, train_args.learning_rate, train_args.weight_decay, accelerator.device)
    steps_per_epoch, max_steps, num_epochs = run_length(
        train_args, len(splits["train"]), accelerator.num_processes
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        math.ceil(train_args.warmup_ratio * max_steps) * accelerator.num_processes,
        max_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, val_dataloader, scheduler = accelerator.prepare(
        model, optimizer, loaders["train"], loaders["validation"], scheduler
    )
    if report:
        tracked = {k: v for k, v in asdict(train_args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("xraycap", config=tracked)

    # Resume: restore model / optimizer / scheduler / RNG states, then skip the batches already consumed. What a
    # resume depends on is stored in every checkpoint and compared on resume.
    resume_arguments = {
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "max_steps": max_steps,
        "train_examples": len(splits["train"]),
        "steps_per_epoch": steps_per_epoch,
        "seed": train_args.seed,
        "mixed_precision": mixed_precision,
    }
    completed_steps, history = resume(accelerator, train_args, output_dir / "checkpoints", resume_arguments)
    starting_epoch = completed_steps // steps_per_epoch
    skip_batches = (completed_steps % steps_per_epoch) * train_args.gradient_accumulation_steps

    metric = evaluate.load(str(METRIC_PATH)) if train_args.do_eval else None
    generation = {"num_beams": train_args.num_beams, "max_new_tokens": train_args.max_new_tokens}

    # Train: an epoch of optimizer steps, then the validation scores of the training curves.
    train_start = time.perf_counter()
    show = accelerator.is_local_main_process
    progress = tqdm(total=max_steps, initial=completed_steps, desc="training", disable=not show)
    model.train()
    nonfinite = NonFiniteSteps(train_args.max_nonfinite_steps, output_dir / "checkpoints")
    steps = StepLog(accelerator, nonfinite, history, progress=progress)
    last_epoch = num_epochs if train_args.do_train and completed_steps < max_steps else starting_epoch
    for epoch in range(starting_epoch, last_epoch):
        completed_steps = train_epoch(
            train_dataloader,
            epoch,
            completed_steps,
            skip_batches=skip_batches if epoch == starting_epoch else 0,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            accelerator=accelerator,
            steps=steps,
            train_args=train_args,
            max_steps=max_steps,
            steps_per_epoch=steps_per_epoch,
            resume_arguments=resume_arguments,
        )
        if metric is not None and len(splits["validation"]):
            evaluate_validation(
                model,
                val_dataloader,
                splits["validation"],
                processor,
                accelerator,
                metric,
                history,
                epoch,
                completed_steps,
                generation,
            )
        if completed_steps >= max_steps:
            break
    progress.close()
    train_time = time.perf_counter() - train_start

    # Save the model folder; the autocast wrapper comes off: test generation runs in fp32, as a reloaded model does.
    unwrapped = save_model_folder(model, processor, accelerator, output_dir)

    # Evaluate on the test split, beside two floors: every image mid-grey, and the nearest train study's report.
    results: dict[str, Any] = {}
    if metric is not None:
        results = evaluate_test(
            model, loaders, splits, processor, accelerator, metric, features, output_dir, history, generation
        )

    # Save the results, the history, the curves and the model card.
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
            "num_examples": {name: len(split) for name, split in splits.items()},
            "finding_sets": build_report.get("finding_sets"),
            "final_train_loss": history["loss"][-1] if history["loss"] else None,
        }
        run_info = describe_run(
            model_args, data_args, train_args, unwrapped, views, results, build_report, synthetic=synthetic
        )
        save_results(output_dir, results, history, run_info)

    # The test set's generation was the last collective: scoring, writing and the Hub upload keep no process waiting.
    if report:
        accelerator.end_training()
    if train_args.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(
            output_dir, train_args.hub_model_id, train_args.hub_private, extra=hub_upload_extra(train_args)
        )
        logger.info(f"Pushed to {url}")
    return results


if __name__ == "__main__":
    main()
