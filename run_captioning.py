#!/usr/bin/env python
"""Train, evaluate, save and push an XrayCap radiology report generator with Accelerate.

With no arguments (`accelerate launch run_captioning.py`, or plain `python run_captioning.py`) it
synthesizes phantom chest X-ray studies, builds them into an Arrow dataset, trains the `tiny` preset on
the CPU, evaluates it on the test split (also with every image replaced by mid-grey, to show how much
the model reads the image) and writes a loadable model folder to `outputs/xraycap-demo/`.

The same script trains the real model on the Indiana University data:

    accelerate launch run_captioning.py --data_dir /path/to/kaggle_copy --preset resnet50-gpt2 \
        --vision_model microsoft/resnet-50 --text_model gpt2 --output_dir outputs/xraycap-iu

Arguments come from the command line or from one YAML / JSON file (`run_captioning.py args.yaml`).
The loop follows transformers' `*_no_trainer.py` examples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup

from captioning_data import IndexedStudies, StudyCollator, model_inputs, precompute_features
from checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from configuration_xraycap import XrayCapConfig
from gradient_clipping import clip_grad_norm_
from master_weights import MasterWeightsAdamW
from model_card import describe_run, format_value, write_model_card
from modeling_xraycap import XrayCapForConditionalGeneration
from pipeline_xraycap import add_pipeline_to_folder
from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor, train_tokenizer

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
METRIC_PATH = REPO_ROOT / "metrics" / "radiology_report"
MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
MASTER_WEIGHTS_CHOICES = ("auto", "on", "off")
# Validation scores kept per epoch (for training_curves.png); METEOR and BERTScore are left to the test split.
CURVE_METRICS = ("bleu_1", "bleu_4", "rouge_l", "cider", "ce_micro_f1", "ce_macro_f1", "ce_example_f1")


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """What model to build or load."""

    preset: str = field(
        default="tiny",
        metadata={
            "help": f"Architecture preset: one of {XrayCapConfig.PRESETS}.",
            "choices": XrayCapConfig.PRESETS,
        },
    )
    vision_model: str | None = field(
        default=None,
        metadata={"help": "Pretrained vision tower (Hub id such as microsoft/resnet-50, or a local folder)."},
    )
    text_model: str | None = field(
        default=None, metadata={"help": "Pretrained GPT-2 (Hub id such as gpt2, or a local folder)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer to use. Default: the text tower's own when --text_model is given, otherwise a "
            "ByteLevel BPE trained on the TRAIN split and saved with the model."
        },
    )
    tokenizer_vocab_size: int = field(
        default=2000, metadata={"help": "Vocabulary size of a locally trained tokenizer."}
    )
    freeze_vision_encoder: bool | None = field(
        default=None,
        metadata={
            "help": "Freeze the image encoder. Default: frozen when it is pretrained (--vision_model), trained "
            "when it starts from random weights."
        },
    )
    visual_tokens: str | None = field(
        default=None,
        metadata={"help": "'pooled' (one token per view) or 'grid' (the feature map). Default: preset's."},
    )
    grid_size: int | None = field(
        default=None,
        metadata={
            "help": "With 'grid' tokens: the feature map is average-pooled to grid_size x grid_size tokens per "
            "view; 0 keeps the encoder's native map (7x7 for ResNet-50 at 224 px). Default: the preset's (4)."
        },
    )
    projection: str | None = field(
        default=None, metadata={"help": "'linear' or 'mlp'. Default: the preset's."}
    )
    max_views: int | None = field(
        default=None,
        metadata={
            "help": "1 (frontal) or 2 (frontal + lateral). Default: the preset's, except for the embedded synthetic "
            "demo, which uses 1 to fit in 10 CPU minutes."
        },
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Model input size in px. Default: the preset's."}
    )


@dataclass
class DataArguments:
    """Where the studies come from and how they are built."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder in the Kaggle layout (indiana_reports.csv, indiana_projections.csv, images/)."
        },
    )
    dataset_dir: str | None = field(
        default=None, metadata={"help": "A dataset already built with `python -m dataset_builder build`."}
    )
    download: bool = field(default=False, metadata={"help": "Download the Kaggle copy with kagglehub first."})
    synthetic_studies: int = field(
        default=2000,
        metadata={
            "help": "Size of the embedded default set of synthetic phantom studies (used when no data is given)."
        },
    )
    section: str = field(
        default="findings", metadata={"help": "Target text: findings | impression | findings+impression."}
    )
    views: str | None = field(
        default=None,
        metadata={"help": "frontal | pair | all. Default: 'frontal' for one-view models, 'pair' for two."},
    )
    min_images: int = field(default=1, metadata={"help": "Keep studies with at least this many images."})
    build_image_size: int = field(
        default=512, metadata={"help": "Longest side of the images stored in the built dataset."}
    )
    r2gen: bool = field(default=False, metadata={"help": "Reproduce the R2Gen population and split."})
    split_file: str | None = field(
        default=None, metadata={"help": "An R2Gen-style annotation.json for the split."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where built datasets are cached. Default: ~/.cache/xraycap."}
    )
    max_target_length: int = field(
        default=128, metadata={"help": "Report tokens kept in training (with bos/eos)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many studies."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})


@dataclass
class TrainingArguments:
    """How to train, evaluate, save and push."""

    output_dir: str = field(default="outputs/xraycap-demo", metadata={"help": "Where the model folder goes."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, initialisation and dropout."})
    num_train_epochs: int = field(default=10, metadata={"help": "Epochs (ignored when --max_steps > 0)."})
    max_steps: int = field(
        default=-1, metadata={"help": "Total optimizer steps; overrides --num_train_epochs."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    per_device_eval_batch_size: int = field(
        default=64, metadata={"help": "Evaluation batch size per process."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps for linear warmup."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables it)."})
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto | no | fp16 | bf16. auto = bf16 where the hardware has it (Ampere+ GPUs, CPUs with AMX / "
            "AVX512-BF16), else fp16 on CUDA and fp32 on CPU. fp16 on CPU falls back to bf16 with a warning.",
            "choices": MIXED_PRECISION_CHOICES,
        },
    )
    master_weights: str = field(
        default="auto",
        metadata={
            "help": "auto | on | off. on = bf16 weights in the model, fp32 master weights in the optimizer "
            "(master_weights.py): no weight or gradient casts in a step. auto = on for single-process CPU bf16 "
            "training without gradient accumulation; off = fp32 weights under autocast.",
            "choices": MASTER_WEIGHTS_CHOICES,
        },
    )
    do_train: bool = field(default=True, metadata={"help": "Train."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on validation each epoch and on test."})
    num_beams: int = field(default=3, metadata={"help": "Beams for evaluation generation."})
    max_new_tokens: int = field(default=100, metadata={"help": "Longest generated report, in tokens."})
    save_steps: int = field(
        default=0, metadata={"help": "Save a checkpoint every N steps (0: epoch ends only)."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder to continue from."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss and learning rate every N steps."})
    report_to: str = field(
        default="none", metadata={"help": "'tensorboard' (or another Accelerate tracker) or 'none'."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the saved model folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id, e.g. user/xraycap-iu."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    cache_features: bool = field(
        default=False,
        metadata={
            "help": "Run the frozen encoder once per image and train on the stored features (needs a frozen "
            "encoder and no image augmentation; same losses, far fewer FLOPs)."
        },
    )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parses the command line, or a single YAML / JSON file, and checks the values before any work."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        args = parser.parse_yaml_file(os.path.abspath(argv[0]))
    elif len(argv) == 1 and argv[0].endswith(".json"):
        args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        args = parser.parse_args_into_dataclasses(args=argv)
    validate_args(*args)
    return args


def validate_args(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments
) -> None:
    """Fails fast, with the bad value and the fix, on arguments that would break later."""
    if model_args.preset not in XrayCapConfig.PRESETS:
        raise ValueError(f"Unknown --preset {model_args.preset!r}; choose one of {XrayCapConfig.PRESETS}.")
    if train_args.num_beams < 1:
        raise ValueError(f"--num_beams must be >= 1, got {train_args.num_beams}.")
    if train_args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {train_args.max_new_tokens}.")
    if train_args.per_device_train_batch_size < 1 or train_args.gradient_accumulation_steps < 1:
        raise ValueError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1.")
    if train_args.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(
            f"--mixed_precision {train_args.mixed_precision!r}: choose one of {MIXED_PRECISION_CHOICES}."
        )
    if train_args.master_weights not in MASTER_WEIGHTS_CHOICES:
        raise ValueError(
            f"--master_weights {train_args.master_weights!r}: choose one of {MASTER_WEIGHTS_CHOICES}."
        )
    if train_args.master_weights == "on" and train_args.gradient_accumulation_steps > 1:
        raise ValueError(
            f"--master_weights on with --gradient_accumulation_steps {train_args.gradient_accumulation_steps}: "
            "the bf16 gradients would be summed in bf16. Use --master_weights off (or auto) to accumulate."
        )
    if Path(train_args.output_dir).exists() and not Path(train_args.output_dir).is_dir():
        raise ValueError(f"--output_dir {train_args.output_dir!r} is a file; give a folder path.")
    if sum(bool(x) for x in (data_args.data_dir, data_args.dataset_dir, data_args.download)) > 1:
        raise ValueError("Give only one of --data_dir, --dataset_dir and --download.")
    if data_args.data_dir is not None:
        missing = [
            n
            for n in ("indiana_reports.csv", "indiana_projections.csv")
            if not (Path(data_args.data_dir) / n).is_file()
        ]
        if missing:
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
    ckpt = train_args.resume_from_checkpoint
    if ckpt is not None and ckpt != "latest" and not Path(ckpt).is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {ckpt!r} does not exist; give a checkpoint folder or 'latest'."
        )
    if train_args.push_to_hub and not train_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/xraycap).")
    if train_args.cache_features and model_args.freeze_vision_encoder is False:
        raise ValueError("--cache_features needs a frozen encoder; drop --freeze_vision_encoder false.")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def uses_synthetic_default(data_args: DataArguments) -> bool:
    """True when no data was given: the embedded synthetic phantom studies are used."""
    return not (data_args.data_dir or data_args.dataset_dir or data_args.download)


def default_cache_dir(data_args: DataArguments) -> Path:
    return Path(data_args.cache_dir or os.environ.get("XRAYCAP_CACHE", Path.home() / ".cache" / "xraycap"))


def load_studies(
    data_args: DataArguments, views: str, seed: int, accelerator: Accelerator
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Returns the train / validation / test studies and the build report.

    Without --data_dir, --dataset_dir or --download this is the embedded default: synthetic phantom
    studies, generated once (cached by size and seed) and built with dataset_builder like real data.
    The main process builds first; the others then read its cache.
    """
    from dataset_builder import build_dataset, download, synthesize

    if data_args.dataset_dir is not None:
        dataset = datasets.load_from_disk(data_args.dataset_dir)
        report_path = Path(data_args.dataset_dir) / "build_report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return dataset, report

    cache = default_cache_dir(data_args)
    with accelerator.main_process_first():
        if data_args.download:
            data_dir = Path(download(cache / "kaggle"))
        elif data_args.data_dir is not None:
            data_dir = Path(data_args.data_dir)
        else:
            data_dir = cache / f"synthetic-{data_args.synthetic_studies}-seed{seed}"
            if not (data_dir / "indiana_projections.csv").is_file():
                logger.info(f"Synthesizing {data_args.synthetic_studies} phantom studies into {data_dir}")
                synthesize(data_dir, num_studies=data_args.synthetic_studies, seed=seed)
        dataset, report = build_dataset(
            data_dir,
            section=data_args.section,
            views=views,
            min_images=data_args.min_images,
            image_size=data_args.build_image_size,
            seed=seed,
            r2gen=data_args.r2gen,
            split_file=data_args.split_file,
            cache_dir=str(cache / "datasets"),
        )
    return dataset, report


# --------------------------------------------------------------------------------------------------
# Tokenizer, processor and model
# --------------------------------------------------------------------------------------------------


def build_processor(
    model_args: ModelArguments, config: XrayCapConfig, train_reports: list[str]
) -> XrayCapProcessor:
    """The text tower's tokenizer when pretrained, else a ByteLevel BPE trained on the TRAIN reports only."""
    name = model_args.tokenizer_name or model_args.text_model
    if name is not None:
        return XrayCapProcessor.from_tokenizer(name, image_size=config.image_size, max_views=config.max_views)
    logger.info(
        f"Training a ByteLevel BPE tokenizer (vocab {model_args.tokenizer_vocab_size}) on the "
        f"{len(train_reports)} train reports"
    )
    tokenizer = train_tokenizer(train_reports, vocab_size=model_args.tokenizer_vocab_size)
    return XrayCapProcessor(
        XrayCapImageProcessor(size=config.image_size), tokenizer, max_views=config.max_views
    )


# The XrayCapConfig fields the command line can override.
ARCHITECTURE_KEYS = ("visual_tokens", "grid_size", "projection", "max_views", "image_size")


def build_config(model_args: ModelArguments, data_args: DataArguments) -> XrayCapConfig:
    """The preset with the command line's overrides; the config is then the single source of truth."""
    overrides = {
        key: getattr(model_args, key) for key in ARCHITECTURE_KEYS if getattr(model_args, key) is not None
    }
    if overrides.get("grid_size") == 0:
        overrides["grid_size"] = None  # the encoder's native feature map
    if uses_synthetic_default(data_args) and model_args.max_views is None and data_args.views is None:
        overrides["max_views"] = 1  # the CPU demo: frontal views only
    freeze = model_args.freeze_vision_encoder
    overrides["freeze_vision_encoder"] = model_args.vision_model is not None if freeze is None else freeze
    return XrayCapConfig.from_preset(model_args.preset, **overrides)


def build_model(model_args: ModelArguments, config: XrayCapConfig, processor: XrayCapProcessor):
    """The model from the preset, or from pretrained towers where --vision_model / --text_model are given."""
    tokenizer = processor.tokenizer
    token_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if model_args.vision_model or model_args.text_model:
        model = XrayCapForConditionalGeneration.from_pretrained_towers(
            vision=model_args.vision_model or "microsoft/resnet-50",
            text=model_args.text_model or "gpt2",
            **{key: getattr(config, key) for key in (*ARCHITECTURE_KEYS, "freeze_vision_encoder")},
            **token_ids,
        )
        if len(tokenizer) != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        return model
    config = XrayCapConfig.from_preset(
        model_args.preset,
        vision_config=config.vision_config.to_dict(),
        text_config={**config.text_config.to_dict(), "vocab_size": len(tokenizer)},
        **{key: getattr(config, key) for key in (*ARCHITECTURE_KEYS, "freeze_vision_encoder")},
        **token_ids,
    )
    return XrayCapForConditionalGeneration(config)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_reports(
    model,
    dataloader: DataLoader,
    processor: XrayCapProcessor,
    accelerator: Accelerator,
    train_args: TrainingArguments,
    desc: str,
) -> dict[int, str]:
    """Beam-search reports for every study of a (sharded) split; every study comes back exactly once.

    Validation during training runs under the training autocast; the final test generation runs after the
    autocast wrapper is removed, in fp32, so a reloaded model reproduces `predictions.jsonl` exactly.
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    pad_id = processor.tokenizer.pad_token_id
    reports: dict[int, str] = {}
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        inputs = model_inputs(batch)
        ids = unwrapped.generate(
            **inputs,
            num_beams=train_args.num_beams,
            max_new_tokens=train_args.max_new_tokens,
            do_sample=False,
        )
        ids = accelerator.pad_across_processes(ids, dim=1, pad_index=pad_id)
        indices, ids = accelerator.gather_for_metrics((batch["index"], ids))
        for index, text in zip(indices.tolist(), processor.batch_decode(ids, skip_special_tokens=True)):
            reports[index] = text.strip()
    unwrapped.train(was_training)
    return reports


def score(metric, split: datasets.Dataset, reports: dict[int, str], **options) -> dict[str, Any]:
    """The radiology_report metrics of generated reports (by row index) against the split's references."""
    references = list(split["report"])  # the text column alone: no image is decoded
    order = sorted(reports)
    return metric.compute(
        predictions=[reports[i] for i in order], references=[references[i] for i in order], **options
    )


def eval_dataloader(
    split, collator: StudyCollator, train_args: TrainingArguments, data_args: DataArguments
) -> DataLoader:
    if data_args.max_eval_samples is not None:
        split = split.select(range(min(len(split), data_args.max_eval_samples)))
    return DataLoader(
        IndexedStudies(split),
        batch_size=train_args.per_device_eval_batch_size,
        shuffle=False,
        collate_fn=collator,
        num_workers=data_args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(
            0
        ),  # never draw from the global RNG (dropout stays reproducible)
    )


# --------------------------------------------------------------------------------------------------
# Outputs: Hub upload
# --------------------------------------------------------------------------------------------------

UPLOAD_IGNORE = ["checkpoints/*", "runs/*", "*.tmp/*"]


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Creates the Hub repo and uploads the saved model folder (checkpoints excluded) with huggingface_hub."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=UPLOAD_IGNORE,
            commit_message="Upload xraycap model trained with run_captioning.py",
        )
    except Exception as err:  # offline, no token, no rights: say what happened and where the model still is
        raise RuntimeError(
            f"Could not push {folder} to the Hub repo {repo_id!r} ({type(err).__name__}: {err}). The model folder is "
            "saved locally; check the network and `hf auth login`, then upload it with "
            f"`hf upload {repo_id} {folder}`."
        ) from err
    return str(repo_url)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def cpu_has_bf16_matmuls() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: oneDNN's bf16 kernels (AMX, AVX512-BF16, or
    AVX-512 conversions). Without them torch runs bf16 matmuls in a scalar fallback, ~150x slower than fp32
    (0.9 vs 133 GFLOP/s on a 2-core AVX2 AMD EPYC), so bf16 "mixed precision" there is a slowdown, not a gain.
    """
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_mixed_precision(requested: str, device_type: str | None = None) -> str:
    """Maps --mixed_precision to what really runs: never a silent fp32 when half precision was asked for.

    `auto` is bf16 on CUDA where supported (else fp16), and on CPU bf16 only where the CPU has bf16 matmul
    hardware ([`cpu_has_bf16_matmuls`]), else fp32 ("no"). An explicit fp16 on CPU becomes bf16 (CPU autocast
    has no fp16 path that pays); an explicit bf16 on a CPU without the hardware is kept, with a warning.

    Args:
        requested (`str`): one of `MIXED_PRECISION_CHOICES`.
        device_type (`str`, *optional*): "cpu" or "cuda"; by default CUDA when it is available and
            `ACCELERATE_USE_CPU` is not set, as Accelerate decides.
    """
    log = logging.getLogger(__name__)
    if device_type is None:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        device_type = "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"
    if device_type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested == "auto":
        if cpu_has_bf16_matmuls():
            return "bf16"
        log.info(
            "--mixed_precision auto: this CPU has no bf16 matmul hardware (AMX / AVX512-BF16), where bf16 runs "
            "~100x slower than fp32; training in fp32. --mixed_precision bf16 forces bf16."
        )
        return "no"
    if requested == "fp16":
        log.warning(
            "--mixed_precision fp16 has no autocast on CPU (Accelerate would silently run fp32); using bf16 instead."
        )
        requested = "bf16"
    if requested == "bf16" and not cpu_has_bf16_matmuls():
        log.warning(
            "--mixed_precision bf16 on a CPU without bf16 matmul hardware (AMX / AVX512-BF16): torch's fallback "
            "runs bf16 matmuls ~100x slower than fp32. --mixed_precision auto (or no) trains in fp32 here."
        )
    return requested


def uses_master_weights(
    requested: str,
    mixed_precision: str,
    device: torch.device,
    distributed_type: DistributedType,
    gradient_accumulation_steps: int = 1,
) -> bool:
    """Resolves --master_weights: whether the model trains with bf16 weights and fp32 master weights
    ([`master_weights.MasterWeightsAdamW`]) instead of fp32 weights under autocast.

    `auto` takes them where they pay: single-process CPU bf16 training with one batch per step (accumulated
    gradients would be summed in bf16; `validate_args` refuses `on` with accumulation). On a GPU the casts are a
    small part of a step, and fp16 needs a GradScaler's fp32 gradients.

    Raises:
        `ValueError` for `on` without bf16 mixed precision.
    """
    if requested == "on" and mixed_precision != "bf16":
        raise ValueError(
            f"--master_weights on needs bf16 mixed precision, but it resolved to {mixed_precision!r}: add "
            "--mixed_precision bf16, or use --master_weights off."
        )
    if requested == "auto":
        single = distributed_type == DistributedType.NO and gradient_accumulation_steps == 1
        return mixed_precision == "bf16" and device.type == "cpu" and single
    return requested == "on"


def optimizer_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name or "ln_" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model,
    learning_rate: float,
    weight_decay: float,
    device: torch.device | None = None,
    master_weights: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (no decay on biases and norms), fused on CPU and CUDA.

    The fused kernel does the same update in one pass instead of ~10 small kernels per tensor (on the 2-core
    CPU at the real size, 126M trainable parameters: 0.08 s instead of 0.58 s per step). With `master_weights`, a
    [`MasterWeightsAdamW`]: the same update, also in one pass per tensor, which turns the model's trainable weight
    matrices into bf16 and keeps their fp32 master weights.
    """
    if master_weights:
        return MasterWeightsAdamW(optimizer_groups(model, weight_decay), lr=learning_rate)
    device = device or next(model.parameters()).device
    return torch.optim.AdamW(
        optimizer_groups(model, weight_decay), lr=learning_rate, fused=device.type in ("cpu", "cuda")
    )


def clip_gradients(accelerator: Accelerator, model, optimizer, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients to global norm `max_norm` before the optimizer step, and return the norm before clipping.

    Single-process and DDP runs without a GradScaler use [`gradient_clipping.clip_grad_norm_`]: the rescale rides
    on the fused AdamW step instead of a pass of its own. fp16 (the GradScaler unscales first), FSDP, DeepSpeed
    and XLA keep `accelerator.clip_grad_norm_`, which knows their sharded or scaled gradients.

    Args:
        accelerator (`Accelerator`): the run's accelerator.
        model (`nn.Module`): the prepared model.
        optimizer (`torch.optim.Optimizer`): the prepared optimizer that steps next.
        max_norm (`float`): the clipping norm (`--max_grad_norm`).
    """
    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.distributed_type in plain and accelerator.scaler is None:
        return clip_grad_norm_(model.parameters(), max_norm, optimizer)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


def training_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training forward: `model(**inputs).loss`, with logits computed only where the loss looks.

    The loss never covers the image prefix, so the LM head and the softmax run on the report positions plus
    the last prefix position (which predicts the first report token): the same loss as the full forward,
    without `prefix_length x vocab_size` logits per study (32 x 50,258 at the real size).
    """
    return model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] + 1).loss


def reuse_freed_memory() -> bool:
    """Keep memory that CPU training frees for the next step, instead of handing it back to the OS.

    glibc serves blocks above 32 MB with `mmap` and unmaps them when freed. A training step allocates and
    frees the same large tensors every time (the logits, the 50k x 768 embedding gradient), so each step
    page-faults them in again: ~300k faults a step at the real size, ~8% of its CPU time. With `mmap` and
    trimming off, those blocks are reused from the heap. Linux glibc only.

    Returns:
        `bool`: whether the setting was applied.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        applied = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return applied


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start_time = time.perf_counter()
    model_args, data_args, train_args = parse_args(argv)
    output_dir = Path(train_args.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    mixed_precision = resolve_mixed_precision(train_args.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per saved file otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    logger.info(
        f"process {accelerator.process_index} of {accelerator.num_processes} on {accelerator.device}, "
        f"mixed precision {mixed_precision}",
        main_process_only=False,
    )

    if accelerator.device.type == "cpu" and reuse_freed_memory():
        logger.info(
            "CPU training: freed memory is kept for reuse (no mmap/trim), saving page faults each step"
        )
    set_seed(train_args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"model": asdict(model_args), "data": asdict(data_args), "training": asdict(train_args)}
        resolved["training"]["mixed_precision_resolved"] = mixed_precision
        (output_dir / "run_args.json").write_text(json.dumps(resolved, indent=2))
    accelerator.wait_for_everyone()

    # Data, tokenizer, model.
    config = build_config(model_args, data_args)
    if train_args.cache_features and not config.freeze_vision_encoder:
        raise ValueError(
            "--cache_features needs a frozen encoder: add --freeze_vision_encoder true (or use --vision_model)."
        )
    views = data_args.views or ("frontal" if config.max_views == 1 else "pair")
    dataset, build_report = load_studies(data_args, views, train_args.seed, accelerator)
    train_split, val_split, test_split = dataset["train"], dataset["validation"], dataset["test"]
    processor = build_processor(model_args, config, train_split["report"])
    set_seed(train_args.seed)
    model = build_model(model_args, config, processor)
    # channels_last: faster convolutions (oneDNN / cuDNN), same math.
    model.vision_model.to(memory_format=torch.channels_last)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable"
    )

    collator = StudyCollator(processor, model.config.max_views, data_args.max_target_length)
    eval_collator = StudyCollator(
        processor, model.config.max_views, data_args.max_target_length, with_text=False
    )
    train_dataloader = DataLoader(
        IndexedStudies(train_split),
        batch_size=train_args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=data_args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: creating an iterator then never draws from the global RNG, so dropout after a
        # resume (RNG restored, iterator re-created) matches the uninterrupted run bit for bit.
        generator=torch.Generator().manual_seed(train_args.seed),
    )
    val_dataloader = eval_dataloader(val_split, eval_collator, train_args, data_args)

    # Optimizer and schedule; the prepared scheduler steps once per process, so its steps are scaled.
    master_weights = uses_master_weights(
        train_args.master_weights,
        mixed_precision,
        accelerator.device,
        accelerator.distributed_type,
        train_args.gradient_accumulation_steps,
    )
    if master_weights:
        logger.info("bf16 weights, fp32 master weights in the optimizer (--master_weights)")
    optimizer = build_optimizer(
        model, train_args.learning_rate, train_args.weight_decay, accelerator.device, master_weights
    )
    steps_per_epoch = math.ceil(
        math.ceil(len(train_split) / (train_args.per_device_train_batch_size * accelerator.num_processes))
        / train_args.gradient_accumulation_steps
    )
    max_steps = (
        train_args.max_steps if train_args.max_steps > 0 else train_args.num_train_epochs * steps_per_epoch
    )
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    warmup_steps = math.ceil(train_args.warmup_ratio * max_steps)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, warmup_steps * accelerator.num_processes, max_steps * accelerator.num_processes
    )
    model, optimizer, train_dataloader, val_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, val_dataloader, scheduler
    )
    if train_args.cache_features:
        encode_loader = accelerator.prepare(
            eval_dataloader(
                train_split,
                eval_collator,
                train_args,
                DataArguments(dataloader_num_workers=data_args.dataloader_num_workers),
            )
        )
        with accelerator.autocast():
            collator.feature_cache = precompute_features(model, encode_loader, accelerator)
    if train_args.report_to != "none":
        accelerator.init_trackers(
            "xraycap",
            config={k: v for k, v in asdict(train_args).items() if isinstance(v, (int, float, str, bool))},
        )

    # Resume: restore model / optimizer / scheduler / RNG states, then skip the batches already consumed.
    history: dict[str, Any] = {"step": [], "loss": [], "lr": [], "epoch_metrics": []}
    completed_steps, starting_epoch, skip_batches = 0, 0, 0
    checkpoint = resolve_checkpoint(train_args.resume_from_checkpoint, output_dir / "checkpoints")
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        completed_steps, history = state["completed_steps"], state["history"]
        starting_epoch = completed_steps // steps_per_epoch
        skip_batches = (completed_steps % steps_per_epoch) * train_args.gradient_accumulation_steps

    def checkpoint_now() -> None:
        state = {"completed_steps": completed_steps, "history": history}
        save_checkpoint(
            accelerator, output_dir / "checkpoints", completed_steps, state, train_args.save_total_limit
        )

    metric = None
    if train_args.do_eval:
        import evaluate

        metric = evaluate.load(str(METRIC_PATH))

    train_start = time.perf_counter()
    progress = tqdm(
        total=max_steps,
        initial=completed_steps,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    for epoch in range(starting_epoch, num_epochs if train_args.do_train else 0):
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == starting_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = training_loss(model, model_inputs(batch))
                accelerator.backward(loss)
                if accelerator.sync_gradients and train_args.max_grad_norm > 0:
                    clip_gradients(accelerator, model, optimizer, train_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            step_loss = accelerator.gather(loss.detach()).float().mean().item()
            lr = scheduler.get_last_lr()[0]
            history["step"].append(completed_steps)
            history["loss"].append(step_loss)
            history["lr"].append(lr)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", epoch=epoch)
            if completed_steps % train_args.logging_steps == 0 and train_args.report_to != "none":
                accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=completed_steps)
            if train_args.save_steps and completed_steps % train_args.save_steps == 0:
                checkpoint_now()
            if completed_steps >= max_steps:
                break
        if completed_steps % steps_per_epoch == 0 or completed_steps >= max_steps:  # a finished epoch
            if not (train_args.save_steps and completed_steps % train_args.save_steps == 0):
                checkpoint_now()
        if metric is not None and len(val_split):
            with accelerator.autocast():  # the whole of generate (bf16 weights need it: --master_weights)
                reports = generate_reports(
                    model, val_dataloader, processor, accelerator, train_args, f"validation, epoch {epoch}"
                )
            if accelerator.is_main_process:
                val_metrics = score(metric, val_split, reports, bertscore=False, meteor=False)
                curves = {key: val_metrics[key] for key in CURVE_METRICS if val_metrics.get(key) is not None}
                history["epoch_metrics"].append({"epoch": epoch, "step": completed_steps, **curves})
                logger.info(
                    f"epoch {epoch}: validation ce_macro_f1 {val_metrics.get('ce_macro_f1')}, bleu_4 {val_metrics.get('bleu_4')}"
                )
                if train_args.report_to != "none":
                    accelerator.log(
                        {f"validation/{k}": v for k, v in val_metrics.items() if isinstance(v, (int, float))},
                        step=completed_steps,
                    )
        if completed_steps >= max_steps:
            break
    progress.close()
    train_time = time.perf_counter() - train_start
    if master_weights:  # the trained model is the fp32 master weights
        optimizer.optimizer.restore_fp32_parameters()

    # Save the model folder: weights (safetensors), config, code files, processor. Training is over, so
    # the autocast wrapper comes off: test generation runs in fp32, as a reloaded model does.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if accelerator.is_main_process:
        unwrapped.config.register_for_auto_class()
        unwrapped.register_for_auto_class("AutoModel")
        processor.register_for_auto_class("AutoProcessor")
        unwrapped.save_pretrained(output_dir, safe_serialization=True)
        processor.save_pretrained(output_dir)
        # pipeline("image-to-text", model=output_dir, trust_remote_code=True)
        add_pipeline_to_folder(output_dir)

    results: dict[str, Any] = {}
    if metric is not None:
        test_dataloader = accelerator.prepare(
            eval_dataloader(test_split, eval_collator, train_args, data_args)
        )
        ablated = StudyCollator(
            processor, unwrapped.config.max_views, data_args.max_target_length, with_text=False, ablate=True
        )
        ablated_dataloader = accelerator.prepare(eval_dataloader(test_split, ablated, train_args, data_args))
        test_reports = generate_reports(model, test_dataloader, processor, accelerator, train_args, "test")
        ablated_reports = generate_reports(
            model, ablated_dataloader, processor, accelerator, train_args, "test, grey images"
        )
        if accelerator.is_main_process:
            results["test"] = score(metric, test_split, test_reports)
            results["test_image_ablated"] = score(metric, test_split, ablated_reports)
            if history["epoch_metrics"]:
                results["validation"] = {
                    k: v for k, v in history["epoch_metrics"][-1].items() if k not in ("epoch", "step")
                }
            uids, references = list(test_split["uid"]), list(test_split["report"])
            with open(output_dir / "predictions.jsonl", "w") as f:
                for index in sorted(test_reports):
                    row = {
                        "id": uids[index],
                        "reference": references[index],
                        "prediction": test_reports[index],
                        "prediction_image_ablated": ablated_reports[index],
                    }
                    f.write(json.dumps(row) + "\n")
            write_samples(output_dir, test_split, test_reports)

    if accelerator.is_main_process:
        results["run"] = {
            "wall_time_s": round(time.perf_counter() - start_time, 1),
            "train_time_s": round(train_time, 1),
            "optimizer_steps": completed_steps,
            "epochs": num_epochs,
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "mixed_precision": mixed_precision,
            "master_weights": master_weights,
            "num_examples": {name: len(split) for name, split in dataset.items()},
            "final_train_loss": history["loss"][-1] if history["loss"] else None,
        }
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        (output_dir / "trainer_history.json").write_text(json.dumps(history))
        from figures import plot_training_curves

        plot_training_curves(history, output_dir / "training_curves.png")
        write_model_card(
            output_dir / "README.md",
            results,
            describe_run(
                model_args,
                data_args,
                train_args,
                unwrapped,
                views,
                results,
                build_report,
                synthetic=uses_synthetic_default(data_args),
            ),
        )
        logger.info(f"Saved the model folder to {output_dir} in {results['run']['wall_time_s']} s")
        if "test" in results:
            logger.info(
                f"test ce_macro_f1 {format_value(results['test'].get('ce_macro_f1'))} (grey images: "
                f"{format_value(results['test_image_ablated'].get('ce_macro_f1'))}), bleu_4 {format_value(results['test'].get('bleu_4'))}"
            )
    if train_args.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(output_dir, train_args.hub_model_id, train_args.hub_private)
        logger.info(f"Pushed to {url}")
    accelerator.wait_for_everyone()
    if train_args.report_to != "none":
        accelerator.end_training()
    return results


def write_samples(
    output_dir: Path, test_split: datasets.Dataset, reports: dict[int, str], count: int = 12
) -> None:
    """`samples.png` / `samples.html`: test images with reference, prediction and the findings that differ."""
    from figures import write_samples_sheet
    from metrics.radiology_report.labeler import label_reports

    indices = sorted(reports)[:count]
    examples = [test_split[i] for i in indices]  # decodes only these studies' images
    predictions = [reports[i] for i in indices]
    ref_labels = label_reports([example["report"] for example in examples])
    pred_labels = label_reports(predictions)
    records = []
    for example, prediction, ref_l, pred_l in zip(examples, predictions, ref_labels, pred_labels):
        records.append(
            {
                "id": example["uid"],
                "image": example["images"][0],
                "reference": example["report"],
                "prediction": prediction,
                "differing_findings": [name for name in ref_l if (ref_l[name] == 1) != (pred_l[name] == 1)],
            }
        )
    write_samples_sheet(records, output_dir / "samples.png", output_dir / "samples.html")


if __name__ == "__main__":
    main()
