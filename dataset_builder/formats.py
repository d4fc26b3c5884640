"""The on-disk layouts `build_dataset` reads, by their `--format` name.

Each format is one module that reads its layout into the shared plan (`study_plan.plan_study`) and defines a
`study_plan.DataFormat` named `FORMAT`; the builder, the schema, the build report, the cache and the output
folder are shared. A third dataset is one more module like `mimic_cxr.py` and one more line here.
"""

from __future__ import annotations

from . import indiana, mimic_cxr
from .study_plan import DataFormat

FORMATS: dict[str, DataFormat] = {fmt.name: fmt for fmt in (indiana.FORMAT, mimic_cxr.FORMAT)}
DEFAULT_FORMAT = "indiana"


def get_format(name: str) -> DataFormat:
    """The `DataFormat` called `name`.

    Raises:
        ValueError: naming the unknown format and the known ones.
    """
    if name not in FORMATS:
        raise ValueError(f"data_format must be one of {tuple(FORMATS)}, got {name!r} (--format)")
    return FORMATS[name]
