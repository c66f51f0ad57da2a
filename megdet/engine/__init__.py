"""The run around the model: training (train.py), COCO evaluation (evaluate.py), metrics logging and
plots (metrics.py), and atomic file writes (files.py)."""
