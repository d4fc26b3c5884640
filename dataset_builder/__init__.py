"""Chest X-ray studies -> a study-level Arrow `DatasetDict` in one schema: the Indiana University collection
(Kaggle layout, the default) or MIMIC-CXR-JPG with its reports (`data_format="mimic-cxr"`, credentialed data
the user brings); synthetic phantom studies in the Indiana or the MIMIC-CXR-JPG layout; the pinned kagglehub
download.

    from xraycap.dataset_builder import build_dataset, synthesize, synthesize_mimic, download

The layouts are in `indiana.py` and `mimic_cxr.py`, registered in `formats.py`; the plan, the builder, the
build report and the saved folder are shared.
"""

from .builder import ChestXrayBuilder, IndianaXrayBuilder, build_dataset
from .configuration import ChestXrayConfig, IndianaXrayConfig
from .download import KAGGLE_HANDLE, download
from .formats import FORMATS
from .synthesize import synthesize
from .synthesize_mimic import synthesize_mimic

__all__ = [
    "ChestXrayBuilder",
    "ChestXrayConfig",
    "FORMATS",
    "IndianaXrayBuilder",
    "IndianaXrayConfig",
    "KAGGLE_HANDLE",
    "build_dataset",
    "download",
    "synthesize",
    "synthesize_mimic",
]
