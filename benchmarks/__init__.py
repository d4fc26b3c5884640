"""xraycap performance harness: `python benchmarks/run.py [--quick]` (see run.py)."""
