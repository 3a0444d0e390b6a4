"""Datasets: COCO-format registration from the config and the synthetic shapes dataset."""
from .datasets import dataset_classes, register_coco_dataset, register_datasets_from_cfg, synthetic_root
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import ensure_synthetic_dataset, generate_split

__all__ = [
    "SYNTHETIC_CLASSES",
    "dataset_classes",
    "ensure_synthetic_dataset",
    "generate_split",
    "register_coco_dataset",
    "register_datasets_from_cfg",
    "synthetic_root",
]
