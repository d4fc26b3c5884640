#!/usr/bin/env python
"""Train, evaluate, save and push an XrayCap radiology report generator with Accelerate.

With no arguments (`accelerate launch run_captioning.py`, or plain `python run_captioning.py`) it synthesizes
phantom chest X-ray studies, builds them into an Arrow dataset, trains the `tiny` preset on the CPU, evaluates
it on the test split (also with every image replaced by mid-grey, to show how much the model reads the image)
and writes a loadable model folder to `outputs/xraycap-demo/`.

The same script trains the real model on the Indiana University data:

    accelerate launch run_captioning.py --data_dir /path/to/kaggle_copy --preset resnet50-gpt2 \
        --vision_model microsoft/resnet-50 --text_model gpt2 --output_dir outputs/xraycap-iu

Arguments come from the command line or from one YAML / JSON file (`run_captioning.py args.yaml`). The script
follows transformers' `examples/pytorch/*_no_trainer.py`; its helpers live in the `training` package.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup

from configuration_xraycap import XrayCapConfig
from pipeline_xraycap import add_pipeline_to_folder
from training.checkpoints import load_checkpoint, nonfinite_parameters, resolve_checkpoint, save_checkpoint
from training.data import StudyCollator, load_studies, model_inputs, precompute_features, study_dataloader
from training.evaluation import generate_reports, score, write_predictions, write_samples
from training.figures import plot_training_curves
from training.hub import push_to_hub
from training.model_card import build_model_card, describe_run, format_value
from training.models import build_config, build_model, build_processor, encoder_is_frozen
from training.nonfinite import NonFiniteSteps
from training.optimization import build_optimizer, training_loss
from training.precision import MIXED_PRECISION_CHOICES, resolve_mixed_precision

logger = get_logger(__name__)

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "radiology_report"
# Validation scores kept per epoch (for training_curves.png); METEOR and BERTScore are left to the test split.
CURVE_METRICS = ("bleu_1", "bleu_4", "rouge_l", "cider", "ce_micro_f1", "ce_macro_f1", "ce_example_f1")


def arg(default: Any, help: str, **metadata) -> Any:
    """A dataclass field with its command-line help (`HfArgumentParser` reads `metadata`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelArguments:
    """What model to build or load."""

    preset: str = arg("tiny", "Architecture preset.", choices=XrayCapConfig.PRESETS)
    vision_model: str | None = arg(
        None, "Pretrained vision tower (Hub id such as microsoft/resnet-50, or a folder)."
    )
    text_model: str | None = arg(None, "Pretrained GPT-2 (Hub id such as gpt2, or a local folder).")
    tokenizer_name: str | None = arg(
        None,
        "Tokenizer. Default: the text tower's own with --text_model, otherwise a ByteLevel BPE trained on the "
        "TRAIN split and saved with the model.",
    )
    tokenizer_vocab_size: int = arg(2000, "Vocabulary size of a locally trained tokenizer.")
    freeze_vision_encoder: bool | None = arg(
        None, "Freeze the image encoder. Default: frozen when pretrained (--vision_model), else trained."
    )
    visual_tokens: str | None = arg(None, "'pooled' (one token per view) or 'grid'. Default: the preset's.")
    grid_size: int | None = arg(
        None,
        "With 'grid' tokens: the feature map is average-pooled to grid_size x grid_size tokens per view; 0 keeps "
        "the encoder's native map (7x7 for ResNet-50 at 224 px). Default: the preset's (4).",
    )
    projection: str | None = arg(None, "'linear' or 'mlp'. Default: the preset's.")
    max_views: int | None = arg(
        None,
        "1 (frontal) or 2 (frontal + lateral). Default: the preset's, except for the embedded synthetic demo, "
        "which uses 1 to fit in 10 CPU minutes.",
    )
    image_size: int | None = arg(None, "Model input size in px. Default: the preset's.")


@dataclass
class DataArguments:
    """Where the studies come from and how they are built."""

    data_dir: str | None = arg(
        None, "A folder in the Kaggle layout (indiana_reports.csv, indiana_projections.csv, images/)."
    )
    dataset_dir: str | None = arg(None, "A dataset already built with `python -m dataset_builder build`.")
    download: bool = arg(False, "Download the Kaggle copy with kagglehub first.")
    synthetic_studies: int = arg(2000, "Synthetic phantom studies of the embedded default (no data given).")
    section: str = arg("findings", "Target text: findings | impression | findings+impression.")
    views: str | None = arg(
        None, "frontal | pair | all. Default: 'frontal' for one-view models, else 'pair'."
    )
    min_images: int = arg(1, "Keep studies with at least this many images.")
    build_image_size: int = arg(512, "Longest side of the images stored in the built dataset.")
    r2gen: bool = arg(False, "Reproduce the R2Gen population and split.")
    split_file: str | None = arg(None, "An R2Gen-style annotation.json for the split.")
    cache_dir: str | None = arg(
        None, "Where built datasets are cached. Default: $XRAYCAP_CACHE or ~/.cache/xraycap."
    )
    max_target_length: int = arg(128, "Report tokens kept in training (with bos/eos).")
    max_eval_samples: int | None = arg(None, "Evaluate on at most this many studies.")
    dataloader_num_workers: int = arg(0, "DataLoader worker processes.")


@dataclass
class TrainingArguments:
    """How to train, evaluate, save and push."""

    output_dir: str = arg(
        "outputs/xraycap-demo",
        "Where the model folder goes. A folder that holds anything is refused unless --overwrite_output_dir or "
        "--resume_from_checkpoint is given.",
    )
    overwrite_output_dir: bool = arg(
        False,
        "Train into a non-empty --output_dir: the files this run writes replace the old ones (others stay), and an "
        "older run's checkpoints/ is deleted at the start (its step numbers would mix with this run's in rotation "
        "and in 'latest').",
    )
    seed: int = arg(42, "Seed for data order, initialisation and dropout.")
    num_train_epochs: int = arg(10, "Epochs (ignored when --max_steps > 0).")
    max_steps: int = arg(-1, "Total optimizer steps; overrides --num_train_epochs.")
    per_device_train_batch_size: int = arg(32, "Batch size per process.")
    per_device_eval_batch_size: int = arg(64, "Evaluation batch size per process.")
    gradient_accumulation_steps: int = arg(1, "Batches per optimizer step.")
    learning_rate: float = arg(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = arg(0.01, "AdamW weight decay (not on biases and norms).")
    warmup_ratio: float = arg(0.05, "Fraction of steps for linear warmup.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0 disables it).")
    max_nonfinite_steps: int = arg(
        10,
        "A step whose loss or gradient norm is NaN / inf changes no weight and is counted (trainer_history.json "
        "'nonfinite_steps'); this many in a row stop the run with an error.",
    )
    mixed_precision: str = arg(
        "auto",
        "Autocast over fp32 weights. auto = bf16 where the hardware has it (Ampere+ GPUs, CPUs with AMX / "
        "AVX512-BF16), else fp16 on CUDA and fp32 on CPU. fp16 on CPU becomes bf16.",
        choices=MIXED_PRECISION_CHOICES,
    )
    torch_compile: bool = arg(
        False,
        "Compile the model with torch.compile (Accelerate's dynamo plugin, inductor backend). Resume a compiled "
        "run's checkpoints with this flag too. On CPU, torch 2.14's inductor fails to build some bf16 training "
        "kernels: add --mixed_precision no there.",
    )
    do_train: bool = arg(True, "Train.")
    do_eval: bool = arg(True, "Evaluate on validation each epoch and on test.")
    num_beams: int = arg(3, "Beams for evaluation generation.")
    max_new_tokens: int = arg(100, "Longest generated report, in tokens.")
    save_steps: int = arg(0, "Save a checkpoint every N steps (0: at epoch ends only).")
    save_total_limit: int = arg(2, "Keep the last K checkpoints (0 keeps all).")
    resume_from_checkpoint: str | None = arg(None, "'latest' or a checkpoint folder to continue from.")
    logging_steps: int = arg(10, "Log loss and learning rate to --report_to every N steps.")
    report_to: str = arg("none", "'tensorboard' (or another Accelerate tracker) or 'none'.")
    push_to_hub: bool = arg(False, "Upload the saved model folder to the Hub.")
    hub_model_id: str | None = arg(None, "Hub repo id, e.g. your-name/xraycap-iu.")
    hub_private: bool = arg(False, "Create the Hub repo as private.")
    hub_upload_extra: str | None = arg(
        None,
        "--push_to_hub uploads only the model repo's files (weights, configs, code, tokenizer, processor, model card). "
        "Comma-separated file patterns to upload as well, e.g. 'predictions.jsonl,eval_results.json,samples.*' "
        "(run_args.json holds local paths; checkpoints/ never goes up).",
    )
    cache_features: bool = arg(
        False,
        "Run the frozen encoder once per image and train on the stored features (needs a frozen encoder; same "
        "losses, far fewer FLOPs).",
    )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parses the command line, or a single YAML / JSON file, and checks the values before any work."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        model_args, data_args, train_args = parser.parse_yaml_file(os.path.abspath(argv[0]))
    elif len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, train_args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)

    # Fail fast, naming the bad value and the fix, on what would break later (argument files skip `choices`).
    if model_args.preset not in XrayCapConfig.PRESETS:
        raise ValueError(f"--preset {model_args.preset!r}: choose one of {XrayCapConfig.PRESETS}.")
    if train_args.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(
            f"--mixed_precision {train_args.mixed_precision!r}: choose one of {MIXED_PRECISION_CHOICES}."
        )
    if train_args.num_beams < 1:
        raise ValueError(f"--num_beams must be >= 1, got {train_args.num_beams}.")
    if train_args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {train_args.max_new_tokens}.")
    if train_args.per_device_train_batch_size < 1 or train_args.gradient_accumulation_steps < 1:
        raise ValueError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1.")
    if Path(train_args.output_dir).exists() and not Path(train_args.output_dir).is_dir():
        raise ValueError(f"--output_dir {train_args.output_dir!r} is a file; give a folder path.")
    # Only the first process looks: the others may start after it has written run_args.json there.
    allowed = train_args.overwrite_output_dir or train_args.resume_from_checkpoint is not None
    if os.environ.get("RANK", "0") == "0" and output_dir_in_use(train_args.output_dir) and not allowed:
        raise ValueError(
            f"--output_dir {train_args.output_dir!r} is not empty: give a new folder, add --overwrite_output_dir true "
            "to replace what it holds, or --resume_from_checkpoint latest to continue its run."
        )
    if train_args.max_nonfinite_steps < 1:
        raise ValueError(f"--max_nonfinite_steps must be >= 1, got {train_args.max_nonfinite_steps}.")
    if sum(bool(x) for x in (data_args.data_dir, data_args.dataset_dir, data_args.download)) > 1:
        raise ValueError("Give only one of --data_dir, --dataset_dir and --download.")
    if data_args.data_dir is not None:
        names = ("indiana_reports.csv", "indiana_projections.csv")
        if missing := [n for n in names if not (Path(data_args.data_dir) / n).is_file()]:
            raise FileNotFoundError(
                f"--data_dir {data_args.data_dir!r} lacks {missing}: point it at the Kaggle layout folder, or use "
                "--download to fetch it."
            )
    if data_args.dataset_dir is not None and not Path(data_args.dataset_dir).is_dir():
        raise FileNotFoundError(
            f"--dataset_dir {data_args.dataset_dir!r} does not exist: build it with `python -m dataset_builder build`."
        )
    if data_args.views not in (None, "frontal", "pair", "all"):
        raise ValueError(f"--views {data_args.views!r}: choose frontal, pair or all.")
    if data_args.synthetic_studies < 20:
        raise ValueError(
            f"--synthetic_studies {data_args.synthetic_studies} is too few for three splits; use >= 20."
        )
    checkpoint = train_args.resume_from_checkpoint
    if checkpoint not in (None, "latest") and not Path(checkpoint).is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {checkpoint!r} does not exist; give a checkpoint folder or 'latest'."
        )
    if train_args.push_to_hub and not train_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/xraycap).")
    if train_args.cache_features and not encoder_is_frozen(model_args):
        raise ValueError(
            "--cache_features needs a frozen encoder: add --freeze_vision_encoder true (or use --vision_model)."
        )
    return model_args, data_args, train_args


def output_dir_in_use(output_dir: str) -> bool:
    """Whether `output_dir` is a folder that holds anything (`.` in a repository checkout does)."""
    path = Path(output_dir)
    return path.is_dir() and any(path.iterdir())


def hub_upload_extra(train_args: TrainingArguments) -> list[str]:
    """The file patterns of `--hub_upload_extra`, as a list."""
    return [p.strip() for p in (train_args.hub_upload_extra or "").split(",") if p.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start_time = time.perf_counter()
    model_args, data_args, train_args = parse_args(argv)
    output_dir = Path(train_args.output_dir)

    # Accelerator: autocast over fp32 weights in the precision this hardware runs well; a seedable sampler so
    # a resumed run sees the same batches.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    mixed_precision = resolve_mixed_precision(train_args.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_dir=str(output_dir / "runs"),  # tracker logs (--report_to)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_backend="inductor" if train_args.torch_compile else None,
    )
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per saved file otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    datasets.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.set_verbosity(verbosity)
    compiled = accelerator.state.dynamo_plugin.backend.value.lower()
    logger.info(
        f"process {accelerator.process_index} of {accelerator.num_processes} on {accelerator.device}, mixed "
        f"precision {mixed_precision}, torch.compile {'off' if compiled == 'no' else f'on ({compiled})'}",
        main_process_only=False,
    )
    if train_args.torch_compile and accelerator.device.type == "cpu" and mixed_precision == "bf16":
        logger.warning(
            "--torch_compile with bf16 on CPU: torch 2.14's Inductor fails to build some bf16 backward kernels "
            "(CppCompileError); if it does here, add --mixed_precision no."
        )
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
    dataset, build_report = load_studies(data_args, views, train_args.seed, accelerator)
    train_split, val_split, test_split = dataset["train"], dataset["validation"], dataset["test"]
    if data_args.max_eval_samples is not None:
        val_split, test_split = (
            s.select(range(min(len(s), data_args.max_eval_samples))) for s in (val_split, test_split)
        )
    processor = build_processor(model_args, config, train_split["report"])
    set_seed(train_args.seed)
    model = build_model(model_args, config, processor)
    # channels_last: faster convolutions (oneDNN / cuDNN), same math.
    model.vision_model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Model: {n_params / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable")

    # Dataloaders (each with its own seeded generator: creating an iterator never draws from the global RNG).
    collator = StudyCollator(processor, config.max_views, data_args.max_target_length)
    eval_collator = StudyCollator(processor, config.max_views, data_args.max_target_length, with_text=False)
    workers, eval_batch = data_args.dataloader_num_workers, train_args.per_device_eval_batch_size
    train_dataloader = study_dataloader(
        train_split,
        collator,
        train_args.per_device_train_batch_size,
        shuffle=True,
        num_workers=workers,
        seed=train_args.seed,
        pin_memory=accelerator.device.type == "cuda",
    )
    val_dataloader = study_dataloader(val_split, eval_collator, eval_batch, num_workers=workers)

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
    if train_args.cache_features:
        encode_loader = accelerator.prepare(
            study_dataloader(train_split, eval_collator, eval_batch, num_workers=workers)
        )
        with accelerator.autocast():
            collator.feature_cache = precompute_features(model, encode_loader, accelerator)
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
    }
    history: dict[str, Any] = {"step": [], "loss": [], "lr": [], "epoch_metrics": [], "nonfinite_steps": []}
    completed_steps, starting_epoch, skip_batches = 0, 0, 0
    checkpoint = resolve_checkpoint(train_args.resume_from_checkpoint, output_dir / "checkpoints")
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, resume_arguments)
        completed_steps, history = state["completed_steps"], {"nonfinite_steps": [], **state["history"]}
        starting_epoch = completed_steps // steps_per_epoch
        skip_batches = (completed_steps % steps_per_epoch) * train_args.gradient_accumulation_steps
        if completed_steps >= max_steps:
            logger.info(
                f"{checkpoint} already holds all {max_steps} steps: no training, only saving and evaluation."
            )

    def checkpoint_now() -> None:
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
    nonfinite = NonFiniteSteps(train_args.max_nonfinite_steps, output_dir / "checkpoints")
    last_epoch = num_epochs if train_args.do_train and completed_steps < max_steps else starting_epoch
    for epoch in range(starting_epoch, last_epoch):
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == starting_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = training_loss(model, model_inputs(batch))
                accelerator.backward(loss)
                finite = True
                if accelerator.sync_gradients:
                    # The norm of the synced gradients is the same on every process; the losses are gathered.
                    max_norm = train_args.max_grad_norm if train_args.max_grad_norm > 0 else math.inf
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    losses = accelerator.gather(loss.detach()).float()
                    finite = bool(torch.isfinite(losses).all()) and math.isfinite(float(grad_norm))
                # A non-finite step updates nothing (fp16's GradScaler skips it itself, and lowers its scale).
                if finite or accelerator.scaler is not None:
                    optimizer.step()
                if finite:
                    scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            step_loss = losses.mean().item()
            nonfinite.record(completed_steps, finite, step_loss, float(grad_norm), history)
            lr = scheduler.get_last_lr()[0]
            # A skipped step's loss is recorded as None (JSON has no NaN); it is listed in nonfinite_steps.
            loss_value = step_loss if finite else None
            for key, value in (("step", completed_steps), ("loss", loss_value), ("lr", lr)):
                history[key].append(value)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", epoch=epoch)
            if completed_steps % train_args.logging_steps == 0 and train_args.report_to != "none":
                accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=completed_steps)
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

    # Evaluate on the test split, with its images and with every image mid-grey.
    results: dict[str, Any] = {}
    if metric is not None:
        reports = {}
        for name, ablate in (("test", False), ("test_image_ablated", True)):
            test_collator = StudyCollator(
                processor, config.max_views, data_args.max_target_length, False, ablate
            )
            loader = accelerator.prepare(
                study_dataloader(test_split, test_collator, eval_batch, num_workers=workers)
            )
            reports[name] = generate_reports(model, loader, processor, accelerator, name, **generation)
            if accelerator.is_main_process:
                results[name] = score(metric, test_split, reports[name])
        if accelerator.is_main_process:
            if history["epoch_metrics"]:
                last = history["epoch_metrics"][-1]
                results["validation"] = {k: v for k, v in last.items() if k not in ("epoch", "step")}
            write_predictions(
                output_dir / "predictions.jsonl", test_split, reports["test"], reports["test_image_ablated"]
            )
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
            "num_examples": {name: len(split) for name, split in dataset.items()},
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
                f"{format_value(grey.get('ce_macro_f1'))}), bleu_4 {format_value(test.get('bleu_4'))}"
            )

    # Push to the Hub.
    if train_args.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(
            output_dir, train_args.hub_model_id, train_args.hub_private, extra=hub_upload_extra(train_args)
        )
        logger.info(f"Pushed to {url}")
    accelerator.wait_for_everyone()
    if train_args.report_to != "none":
        accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
