"""xraycap's helper packages, installed under one name.

- `xraycap.training`: what `run_captioning.py` is made of (arguments, data, the loop's parts, evaluation, saving).
- `xraycap.inference` and `xraycap.caption`: loading a trained model, and the `xraycap-caption` command.
- `xraycap.dataset_builder` (the `dataset_builder/` folder: `python -m dataset_builder`) and
  `xraycap.radiology_report` (the `metrics/radiology_report/` folder: `evaluate.load("metrics/radiology_report")`).

The model files (`configuration_xraycap.py`, `modeling_xraycap.py`, `processing_xraycap.py`, ...) stay at the
repository root, where a saved model folder carries them.
"""
