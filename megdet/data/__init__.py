"""Data: COCO records (coco.py), the record -> model input transforms (transforms.py), the synthetic
shapes data set (synth.py)."""
