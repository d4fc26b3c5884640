"""What `run_captioning.py` needs beyond its loop, one concept a module: `models` (the config, processor and
model a run trains), `data` (batches and the feature cache), `precision`, `optimization` (AdamW and the
training loss), `checkpoints`, `evaluation`, `figures`, `model_card` and `hub`. Imported by the entry points
and the benchmarks, never by the model files; import the module you need (`from xraycap.training.data import ...`)."""
