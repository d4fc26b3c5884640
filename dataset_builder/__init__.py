"""Indiana University chest X-rays (Kaggle layout) -> a study-level Arrow `DatasetDict`; synthetic phantom
studies in the same layout; the pinned kagglehub download.

    from dataset_builder import build_dataset, synthesize, download
"""

from .builder import IndianaXrayBuilder, build_dataset
from .configuration import IndianaXrayConfig
from .download import KAGGLE_HANDLE, download
from .synthesize import synthesize

__all__ = [
    "IndianaXrayBuilder",
    "IndianaXrayConfig",
    "KAGGLE_HANDLE",
    "build_dataset",
    "download",
    "synthesize",
]
