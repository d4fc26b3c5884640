"""The `radiology_report` evaluate module and its rule-based CheXpert-style labeler.

Load the metric with `evaluate.load("<repo>/metrics/radiology_report")`; the labeler is importable on its
own as `from xraycap.radiology_report.labeler import label_reports`.
"""

from .labeler import CHEXPERT_OBSERVATIONS, label_report, label_reports

__all__ = ["CHEXPERT_OBSERVATIONS", "label_report", "label_reports"]
