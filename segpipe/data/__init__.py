"""Datasets: the synthetic shapes domain and COCO-format loaders for training."""
