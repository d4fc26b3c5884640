"""Optimizer steps with a non-finite loss or gradient norm: skipped, counted, and a stop after too many in a row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)


class NonFiniteSteps:
    """Records each optimizer step whose loss or gradient norm was NaN / inf (the loop skipped its update).

    The steps go into `history["nonfinite_steps"]` (saved in checkpoints and `trainer_history.json`), each with a
    warning; `limit` of them in a row raise, since the run is then diverging rather than meeting one bad batch.

    Args:
        limit (`int`): `--max_nonfinite_steps`.
        checkpoint_dir (`Path`): where the run's checkpoints are (named in the error).
    """

    def __init__(self, limit: int, checkpoint_dir: Path):
        self.limit, self.checkpoint_dir, self.in_a_row = limit, checkpoint_dir, 0

    def record(self, step: int, finite: bool, loss: float, grad_norm: float, history: dict[str, Any]) -> None:
        """Counts step `step`; raises `RuntimeError` at the `limit`-th non-finite step in a row."""
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        history.setdefault("nonfinite_steps", []).append(step)
        logger.warning(
            f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); no weight updated "
            f"({self.in_a_row} such steps in a row, --max_nonfinite_steps {self.limit})."
        )
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient norm "
                f"(--max_nonfinite_steps {self.limit}); stopping. The checkpoints in {self.checkpoint_dir} hold finite "
                "weights: lower --learning_rate, try --mixed_precision no, or check the data, then resume with "
                "--resume_from_checkpoint latest."
            )
