"""Datasets: COCO-format registration and checks from the config, and the synthetic shapes dataset."""
from .datasets import dataset_classes, prepare_datasets, register_coco_dataset, register_datasets, synthetic_root
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import ensure_synthetic_dataset, generate_split

__all__ = [
    "SYNTHETIC_CLASSES",
    "dataset_classes",
    "ensure_synthetic_dataset",
    "generate_split",
    "prepare_datasets",
    "register_coco_dataset",
    "register_datasets",
    "synthetic_root",
]
