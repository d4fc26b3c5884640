"""Deterministic study-level train / validation / test splits.

Split arithmetic (R2Gen's 70/10/20 on 2,955 studies gives 2,069 / 296 / 590): the train and validation
sizes are `ratio * n` rounded half UP, computed in exact integer arithmetic (`(7 * n + 5) // 10` and
`(n + 5) // 10` for the 70/10/20 ratios), and test takes the rest. For n = 2,955: 0.7 n = 2,068.5 ->
2,069; 0.1 n = 295.5 -> 296; test = 2,955 - 2,069 - 296 = 590. (Python's `round` rounds half to even
and would give 2,068; `int(0.7 * n)` truncates to 2,068: neither reproduces R2Gen.)

Membership: the sorted study uids are permuted with `numpy.random.default_rng(seed)`; the first
`n_train` go to train, the next `n_val` to validation, the rest to test. Splitting by study (`uid`)
keeps the frontal and lateral views of a study in one split.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_RATIOS = (0.7, 0.1, 0.2)


def split_sizes(n: int, ratios: tuple[float, float, float] = DEFAULT_RATIOS) -> tuple[int, int, int]:
    """Sizes of the three splits for `n` studies (train and validation rounded half up; test the rest).

    Args:
        n (`int`): number of studies.
        ratios (`tuple[float, float, float]`, defaults to (0.7, 0.1, 0.2)): train / validation / test.

    Returns:
        `tuple[int, int, int]`: (n_train, n_validation, n_test), summing to `n`.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")
    fr = [Fraction(str(r)) for r in ratios]
    n_train = int(fr[0] * n + Fraction(1, 2))
    n_val = int(fr[1] * n + Fraction(1, 2))
    n_val = min(n_val, n - n_train)
    return n_train, n_val, n - n_train - n_val


def assign_splits(
    uids: list[str], seed: int = 42, ratios: tuple[float, float, float] = DEFAULT_RATIOS
) -> dict[str, str]:
    """Maps each study uid to "train", "validation" or "test", deterministically from `seed`.

    Args:
        uids (`list[str]`): the study uids (order does not matter; duplicates are not allowed).
        seed (`int`, defaults to 42): permutation seed.
        ratios (`tuple[float, float, float]`, defaults to (0.7, 0.1, 0.2)): split ratios.

    Returns:
        `dict[str, str]`: uid -> split name.
    """
    ordered = sorted(set(uids), key=_uid_sort_key)
    if len(ordered) != len(uids):
        raise ValueError("assign_splits got duplicate uids")
    n_train, n_val, _ = split_sizes(len(ordered), ratios)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    out = {}
    for rank, idx in enumerate(perm):
        out[ordered[idx]] = "train" if rank < n_train else "validation" if rank < n_train + n_val else "test"
    return out


def _uid_sort_key(uid: str) -> tuple[int, int | str]:
    return (0, int(uid)) if uid.isdigit() else (1, uid)
