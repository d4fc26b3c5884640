"""run_captioning's command line: the argument dataclasses, a config file plus overrides, and the checks.

`parse_args` reads the command line, or a YAML / JSON file (`configs/*.yaml`) followed by overriding arguments,
into `ModelArguments`, `DataArguments` and `TrainingArguments` (`HfArgumentParser`, as transformers' examples do),
and refuses what would fail later, naming the value and the fix, before any work.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from configuration_xraycap import XrayCapConfig

from .distributed import MIXED_PRECISION_CHOICES
from .models import encoder_is_frozen


def arg(default: Any, help: str, **metadata) -> Any:
    """A dataclass field with its command-line help (`HfArgumentParser` reads `metadata`; argparse formats help
    with `%`, so a literal "5 %" is escaped here)."""
    return field(default=default, metadata={"help": help.replace("%", "%%"), **metadata})


@dataclass
class ModelArguments:
    """What model to build or load."""

    preset: str = arg("tiny", "Architecture preset.", choices=XrayCapConfig.PRESETS)
    vision_model: str | None = arg(
        None,
        "Pretrained vision tower, a Hub id or a folder: transformers ResNet / ConvNeXt / ViT / DeiT / Swin (e.g. "
        "microsoft/resnet-50, google/vit-base-patch16-224) or a timm checkpoint (e.g. timm/convnext_tiny.fb_in1k).",
    )
    text_model: str | None = arg(
        None, "Pretrained GPT-2-family decoder, a Hub id or a folder: gpt2, distilgpt2, gpt2-medium, ..."
    )
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
    section: str | None = arg(
        None,
        "Target text: findings | impression | findings+impression. Default: 'findings', or as built with --dataset_dir.",
    )
    views: str | None = arg(
        None,
        "frontal | pair | all. Default: 'frontal' for one-view models, else 'pair'; as built with --dataset_dir.",
    )
    min_images: int | None = arg(
        None, "Keep studies with at least this many images. Default: 1 (2 with --r2gen), or as built."
    )
    build_image_size: int | None = arg(
        None, "Longest side of the images stored in the built dataset. Default: 512, or as built."
    )
    r2gen: bool | None = arg(None, "Reproduce the R2Gen population and split. Default: false, or as built.")
    split_file: str | None = arg(
        None, "An R2Gen-style annotation.json for the split. Default: none, or as built."
    )
    num_proc: int | None = arg(
        None,
        "Processes building the dataset (--data_dir, --download, the synthetic default). Default: all cores.",
    )
    cache_dir: str | None = arg(
        None, "Where built datasets are cached. Default: $XRAYCAP_CACHE or ~/.cache/xraycap."
    )
    max_target_length: int = arg(128, "Report tokens kept in training (with bos/eos).")
    split_seed: int | None = arg(
        None,
        "Seed of the study-level split and of the synthetic phantoms. Default: --seed (one run) or the first seed.",
    )
    folds: int = arg(
        1,
        "K-fold cross-validation by study: K runs, each validating on a different K-th of the train + validation "
        "studies (the test split is untouched), in OUTPUT_DIR/fold-<k>/, summarized in OUTPUT_DIR/eval_summary.json.",
    )
    fold: int | None = arg(None, "With --folds K: run only this fold (0 to K-1).")
    max_eval_samples: int | None = arg(None, "Evaluate on at most this many studies.")
    dataloader_num_workers: int | None = arg(
        None,
        "DataLoader worker processes decoding images. Default: the usable CPU cores divided by the training processes "
        "on this machine, at most 8.",
    )


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
    num_seeds: int = arg(
        1,
        "Train this many runs (seeds --seed, --seed + 1, ...) on the same split, in OUTPUT_DIR/seed-<s>/; every "
        "metric's mean and std go to OUTPUT_DIR/eval_summary.json and the model cards.",
    )
    num_train_epochs: int = arg(16, "Epochs (ignored when --max_steps > 0).")
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
    tf32: bool | None = arg(
        None,
        "Let fp32 matmuls and convolutions use TF32 on Ampere+ GPUs (torch.backends.*.allow_tf32), as Trainer's "
        "--tf32. Default: torch's own setting.",
    )
    ddp_timeout: int = arg(
        1800,
        "Seconds a process waits at a collective (a barrier while the main process builds the dataset, a "
        "gather) before the run fails; torch's default is 600. Build big data first with `python -m "
        "dataset_builder build` and pass --dataset_dir.",
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
    augment: bool = arg(
        False,
        "Augment the training images, anew every epoch: rotation (+-5 degrees), scale (0.9-1.1), shift (5 %), "
        "brightness and contrast (+-10 %); never a left-right flip (reports say left and right). Evaluation "
        "images are never augmented. Turns --cache_features off.",
    )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parses the command line, or a single YAML / JSON file, and checks the values before any work."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):  # a config file, then overrides
        argv = config_file_arguments(argv[0]) + argv[1:]
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)

    # Fail fast, naming the bad value and the fix, on what would break later.
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
    resolve_build_options(data_args)
    if data_args.views not in (None, "frontal", "pair", "all"):
        raise ValueError(f"--views {data_args.views!r}: choose frontal, pair or all.")
    if data_args.synthetic_studies < 20:
        raise ValueError(
            f"--synthetic_studies {data_args.synthetic_studies} is too few for three splits; use >= 20."
        )
    checkpoint = train_args.resume_from_checkpoint
    if checkpoint not in (None, "latest") and is_repeated(data_args, train_args):
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} with --num_seeds / --folds: use 'latest' (each run resumes "
            "its own newest checkpoint)."
        )
    if checkpoint not in (None, "latest") and not Path(checkpoint).is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {checkpoint!r} does not exist; give a checkpoint folder or 'latest'."
        )
    if train_args.num_seeds < 1 or data_args.folds < 1:
        raise ValueError(f"--num_seeds {train_args.num_seeds} and --folds {data_args.folds} must be >= 1.")
    if data_args.fold is not None and not 0 <= data_args.fold < data_args.folds:
        raise ValueError(
            f"--fold {data_args.fold} needs --folds K with 0 <= fold < K (got K={data_args.folds})."
        )
    if train_args.push_to_hub and is_repeated(data_args, train_args):
        raise ValueError(
            "--push_to_hub with --num_seeds / --folds: push one run's folder (OUTPUT_DIR/<run>) with the same "
            "command and --num_seeds 1 --fold <k>, or upload it with `huggingface-cli upload`."
        )
    if train_args.push_to_hub and not train_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/xraycap).")
    if train_args.cache_features and not encoder_is_frozen(model_args):
        raise ValueError(
            "--cache_features needs a frozen encoder: add --freeze_vision_encoder true (or use --vision_model)."
        )
    return model_args, data_args, train_args


# The build options a run passes to dataset_builder: argument name -> (its key in build_report.json, default).
BUILD_OPTIONS = {
    "section": ("section", "findings"),
    "views": ("views", None),
    "min_images": ("min_images", 1),
    "build_image_size": ("image_size", 512),
    "r2gen": ("r2gen", False),
    "split_file": ("split_file", None),
}


def resolve_build_options(data_args: DataArguments) -> None:
    """Fills the build options left out (None) in place: with `--dataset_dir` from its `build_report.json`, else
    with their defaults (`--views` is then chosen from the model). With `--dataset_dir`, an option given with a
    value other than the built one is refused: the dataset is used as built, never silently as something else."""
    if data_args.dataset_dir is None:
        for name, (_, default) in BUILD_OPTIONS.items():
            if getattr(data_args, name) is None:
                setattr(data_args, name, default)
        return
    report_path = Path(data_args.dataset_dir) / "build_report.json"
    given = {name: getattr(data_args, name) for name in BUILD_OPTIONS if getattr(data_args, name) is not None}
    if not report_path.is_file():
        if given:
            raise ValueError(
                f"--dataset_dir {data_args.dataset_dir!r} has no build_report.json, so {sorted(given)} cannot be "
                "checked against how it was built: drop those options, or rebuild it with `python -m dataset_builder "
                "build`."
            )
        return
    built = json.loads(report_path.read_text()).get("options", {})
    for name, (key, _) in BUILD_OPTIONS.items():
        value, built_value = getattr(data_args, name), built.get(key)
        if value is None:
            setattr(data_args, name, built_value)
            continue
        wanted = value
        if name == "split_file":
            wanted = str(Path(value).expanduser().resolve())
        elif name == "min_images" and built.get("r2gen"):
            wanted = max(value, 2)  # the R2Gen population raises it to 2, as a build does
        if wanted != built_value:
            rebuild = f"--{key} {value}" if name != "r2gen" else ("--r2gen" if value else "without --r2gen")
            raise ValueError(
                f"--{name} {value!r} differs from the built dataset's {key} {built_value!r} (in {report_path}). The "
                f"dataset is used as built: drop --{name}, or rebuild it with `python -m dataset_builder build ... "
                f"{rebuild}` into another --output_dir and train on that."
            )


def config_file_arguments(path: str) -> list[str]:
    """The command-line form of a YAML / JSON config file (`configs/*.yaml`), so later arguments override it."""
    text = Path(path).read_text()
    values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(
            f"{path} must hold a mapping of argument names to values, got {type(values).__name__}."
        )
    known = {f.name for group in (ModelArguments, DataArguments, TrainingArguments) for f in fields(group)}
    if unknown := sorted(set(values) - known):
        raise ValueError(
            f"{path}: unknown argument(s) {unknown}; `python run_captioning.py --help` lists them."
        )
    argv = []
    for key, value in values.items():
        if value is not None:  # null keeps the default
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def is_repeated(data_args: DataArguments, train_args: TrainingArguments) -> bool:
    """Whether the arguments ask for several runs (`--num_seeds` > 1, or `--folds` > 1 without one `--fold`)."""
    return train_args.num_seeds > 1 or (data_args.folds > 1 and data_args.fold is None)


def output_dir_in_use(output_dir: str) -> bool:
    """Whether `output_dir` is a folder that holds anything (`.` in a repository checkout does)."""
    path = Path(output_dir)
    return path.is_dir() and any(path.iterdir())


def hub_upload_extra(train_args: TrainingArguments) -> list[str]:
    """The file patterns of `--hub_upload_extra`, as a list."""
    return [p.strip() for p in (train_args.hub_upload_extra or "").split(",") if p.strip()]
