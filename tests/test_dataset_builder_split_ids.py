"""R2Gen `--split_file` ids in every Open-i form map to the Kaggle study they name."""

import json
import logging

import pandas as pd
import pytest
from xraycap.dataset_builder.split_file import read_split_file

PROJECTIONS = pd.DataFrame(
    {
        "uid": ["1", "1", "10", "10", "2"],
        "filename": [
            "1_IM-0001-4001.dcm.png",
            "1_IM-0001-3001.dcm.png",
            "10_IM-0002-1001.dcm.png",
            "10_IM-0002-2001.dcm.png",
            "2_IM-0652-1001-0001.dcm.png",
        ],
    }
)
REPORT_UIDS = ["1", "2", "10"]


def _read(tmp_path, ids: dict[str, list[str]]):
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps({k: [{"id": i} for i in v] for k, v in ids.items()}))
    return read_split_file(path, REPORT_UIDS, PROJECTIONS)


@pytest.mark.parametrize(
    "example_id",
    [
        "CXR1_IM-0001",
        "CXR1_IM-0001-4001",
        "CXR1_1_IM-0001",  # R2Gen's own annotation.json has this form
        "CXR1_1_IM-0001-3001",
        "CXR1_1_IM-0001-3001.png",
        "cxr1_1_im-0001-4001.PNG",
        "CXR1_1_IM-0001/0.png",  # R2Gen's image_path form
        "NLMCXR_png/CXR1_1_IM-0001-4001.png",
        "1_IM-0001-4001.dcm.png",  # the Kaggle file name
    ],
)
def test_every_open_i_id_form_matches_its_study_exactly(tmp_path, example_id):
    membership, unmatched, matched_by = _read(tmp_path, {"train": [example_id]})
    assert membership == {"1": "train"}
    assert unmatched == []
    assert matched_by == {"exact": 1, "number_only": 0, "series_only": 0}


def test_extra_number_after_the_uid_is_not_taken_for_the_uid(tmp_path):
    """`CXR10_1_IM-0002` is study 10 (not study 1); `CXR2_IM-0652-1001-0001` is study 2."""
    membership, unmatched, _ = _read(
        tmp_path, {"val": ["CXR10_1_IM-0002-1001"], "test": ["CXR2_IM-0652-1001-0001"]}
    )
    assert membership == {"10": "validation", "2": "test"} and unmatched == []


def test_unmatched_id_is_a_warning_naming_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="xraycap.dataset_builder.split_file"):
        membership, unmatched, _ = _read(tmp_path, {"train": ["CXR1_1_IM-0001", "CXR99_2_IM-9999-1001"]})
    assert membership == {"1": "train"}
    assert unmatched == ["CXR99_2_IM-9999-1001"]
    assert "CXR99_2_IM-9999-1001" in caplog.text
