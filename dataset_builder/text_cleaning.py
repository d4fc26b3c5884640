"""Explicit, documented report text cleaning.

The raw `findings` / `impression` columns are kept as they are in the CSV (only stripped); the cleaned
text goes to the `report` column (the training target), and the options used are written to the build
report, so every change can be reproduced or undone from the raw columns.

Cleaning steps, in order:
1. whitespace: every run of spaces, tabs and newlines becomes one space; leading/trailing removed;
2. repeated periods: ". ." / ".." / ". . ." become a single "."; a space before a period is removed;
3. anonymisation tokens (each data format names its own: Indiana's `XXXX`, also in "XXXX-year-old",
   is `XXXX_TOKEN`; MIMIC-CXR's `___` is `mimic_cxr.ANON_TOKEN`): "keep" (default: the R2Gen convention,
   where they stay in the text, as "xxxx" after lower-casing), "drop" (removed, then whitespace and
   punctuation are tidied), or "marker" (replaced with `XXXX_MARKER`, a single token that is easy to mask
   in the loss or in the metrics). The option keeps its Indiana name, `xxxx`, for every format.
"""

from __future__ import annotations

import re

XXXX_MODES = ("keep", "drop", "marker")
XXXX_MARKER = "[ANON]"

_WS = re.compile(r"\s+")
XXXX_TOKEN = re.compile(r"X{4,}")
_REPEATED_PERIODS = re.compile(r"\s*\.(?:\s*\.)+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:])")
_EMPTY_PUNCT = re.compile(r"(^|[.;:]\s*)[,;:]\s*")


def clean_text(text: str | None, xxxx: str = "keep", token: re.Pattern = XXXX_TOKEN) -> str:
    """Cleans one report section.

    Args:
        text (`str`, *optional*): the raw section (None / NaN count as empty).
        xxxx (`str`, defaults to "keep"): what to do with anonymisation tokens: "keep", "drop" or "marker".
        token (`re.Pattern`, defaults to `XXXX_TOKEN`): the format's anonymisation token (Indiana's `XXXX`).

    Returns:
        `str`: the cleaned text ("" when the section is empty).
    """
    if xxxx not in XXXX_MODES:
        raise ValueError(f"xxxx must be one of {XXXX_MODES}, got {xxxx!r}")
    if text is None or not isinstance(text, str):
        return ""
    out = _WS.sub(" ", text).strip()
    if xxxx == "drop":
        out = token.sub("", out)
    elif xxxx == "marker":
        out = token.sub(XXXX_MARKER, out)
    out = _REPEATED_PERIODS.sub(".", out)
    out = _SPACE_BEFORE_PUNCT.sub(r"\1", out)
    if xxxx == "drop":
        out = _EMPTY_PUNCT.sub(r"\1", out)
        out = re.sub(r"(?<=\w)-(?=\s)|(?<=\s)-(?=\w)|^-", "", out)
        out = _REPEATED_PERIODS.sub(".", out)
        out = _WS.sub(" ", out).strip()
        if out in {".", ",", ";"}:
            out = ""
    return out


def join_sections(findings: str, impression: str) -> str:
    """Joins findings and impression (already cleaned) into one target text."""
    return " ".join(part for part in (findings, impression) if part)
