"""What the two ways of using a trained model, `xraycap.caption` (the command line) and `app.py` (the demo),
share: `model_source` (which model a name means, the model options, loading the model folder's own
image-to-text pipeline safely, what its card says about its training data). Imported by those entry points,
never by the model files."""
