"""What `run_captioning.py` needs beyond its loop: the model and data it trains, precision, the optimizer,
checkpoints, evaluation, figures, the model card and the Hub upload. Imported by the entry points and the
benchmarks, never by the model files."""

from .checkpoints import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import (
    IndexedStudies,
    StudyCollator,
    load_studies,
    model_inputs,
    precompute_features,
    study_dataloader,
)
from .evaluation import generate_reports, score, write_predictions, write_samples
from .figures import plot_training_curves, write_samples_sheet
from .hub import push_to_hub
from .model_card import build_model_card, describe_run, format_value
from .models import build_config, build_model, build_processor, encoder_is_frozen
from .optimization import build_optimizer, training_loss
from .precision import MIXED_PRECISION_CHOICES, cpu_has_bf16_matmuls, resolve_mixed_precision

__all__ = [
    "MIXED_PRECISION_CHOICES",
    "IndexedStudies",
    "StudyCollator",
    "build_config",
    "build_model",
    "build_model_card",
    "build_processor",
    "build_optimizer",
    "cpu_has_bf16_matmuls",
    "describe_run",
    "encoder_is_frozen",
    "format_value",
    "generate_reports",
    "list_checkpoints",
    "load_studies",
    "load_checkpoint",
    "model_inputs",
    "plot_training_curves",
    "precompute_features",
    "push_to_hub",
    "resolve_checkpoint",
    "resolve_mixed_precision",
    "save_checkpoint",
    "score",
    "study_dataloader",
    "training_loss",
    "write_predictions",
    "write_samples",
    "write_samples_sheet",
]
