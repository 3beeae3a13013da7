"""Data pipeline of the detector: COCO-format datasets, transforms, loaders, embedded dataset."""
