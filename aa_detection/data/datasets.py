"""Dataset registration driven by the config: any COCO-format dataset, and the synthetic shapes.

- ``DATASETS.REGISTER``: a list of ``[name, json_file, image_root]``; each is registered as a COCO-format
  dataset whose JSON, images and boxes are checked when it is loaded (``validation.py``;
  ``DATASETS.BAD_IMAGES`` and ``DATASETS.CHECK_IMAGES``), its class names read from the JSON's categories.
- ``DATASETS.SYNTHETIC``: the names ``synthetic_train`` and ``synthetic_val`` are registered on the
  generated shapes dataset under ``DATASETS.SYNTHETIC.ROOT`` (default ``$DETECTRON2_DATASETS/synthetic``,
  that is ``datasets/synthetic``), which is generated first when it is missing.

After registration ``MODEL.RETINANET.NUM_CLASSES`` is set to the class count of the training
datasets; training and test datasets whose classes disagree raise a ``ValueError``.
"""
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .synthetic import ensure_synthetic_dataset, split_paths
from .validation import read_coco_json, register_checked_coco

__all__ = ["register_coco_dataset", "register_datasets_from_cfg", "synthetic_root", "dataset_classes"]

logger = logging.getLogger(__name__)

SYNTHETIC_SPLITS = {"synthetic_train": "train", "synthetic_val": "val"}


def _coco_classes(json_file):
    cats = read_coco_json(json_file)["categories"]  # DatasetError naming the file if malformed
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def register_coco_dataset(name, json_file, image_root, bad_images="error", check_images="decode"):
    """Register a COCO-format detection dataset under `name` (idempotent for the same files; a name
    registered on other files is re-registered on these).

    Its ``thing_classes`` metadata is read from the JSON right away, so the class count is known
    before the data is loaded. Returns the list of class names.
    """
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset '{name}': annotation file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"dataset '{name}': image folder not found: {image_root}")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file") == json_file and meta.get("image_root") == image_root:
            register_checked_coco(name, json_file, image_root, bad_images, check_images)  # updates policies
            return list(meta.thing_classes)
        # the latest config wins: re-register the name on the new files
        logger.warning("dataset '%s' was registered on %s, %s; re-registering it on %s, %s", name,
                       meta.get("json_file"), meta.get("image_root"), json_file, image_root)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    classes = _coco_classes(json_file)
    register_checked_coco(name, json_file, image_root, bad_images, check_images)
    MetadataCatalog.get(name).set(thing_classes=classes)
    return classes


def synthetic_root(cfg):
    root = cfg.DATASETS.SYNTHETIC.ROOT
    if not root:
        root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "synthetic")
    return os.path.abspath(root)


def dataset_classes(name):
    """The class names of a registered dataset, or None when its metadata does not say."""
    if name not in DatasetCatalog.list():
        raise KeyError(f"dataset '{name}' is not registered; register it with --dataset NAME JSON "
                       f"IMAGE_ROOT or DATASETS.REGISTER, or see detectron2's builtin datasets")
    classes = MetadataCatalog.get(name).get("thing_classes")
    return list(classes) if classes is not None else None


def register_datasets_from_cfg(cfg):
    """Register what `cfg` asks for and set its class count; `cfg` must be mutable."""
    policies = (cfg.DATASETS.BAD_IMAGES, cfg.DATASETS.CHECK_IMAGES)
    for entry in cfg.DATASETS.REGISTER:
        if len(entry) != 3:
            raise ValueError(f"DATASETS.REGISTER entries are [name, json_file, image_root], got {entry}")
        register_coco_dataset(*entry, *policies)

    wanted = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    syn = cfg.DATASETS.SYNTHETIC
    if wanted & set(SYNTHETIC_SPLITS):
        root = ensure_synthetic_dataset(synthetic_root(cfg), syn.NUM_TRAIN, syn.NUM_VAL, syn.SEED)
        for name, split in SYNTHETIC_SPLITS.items():
            register_coco_dataset(name, *split_paths(root, split), *policies)

    train_classes = None
    for name in cfg.DATASETS.TRAIN:
        classes = dataset_classes(name)
        if classes is None:
            continue
        if train_classes is not None and classes != train_classes:
            raise ValueError(f"training datasets disagree on their classes: {cfg.DATASETS.TRAIN}")
        train_classes = classes
    for name in cfg.DATASETS.TEST:
        classes = dataset_classes(name)
        if train_classes is not None and classes is not None and classes != train_classes:
            raise ValueError(f"test dataset '{name}' has classes {classes}, the training datasets "
                             f"{cfg.DATASETS.TRAIN} have {train_classes}")
    if train_classes is not None and cfg.MODEL.RETINANET.NUM_CLASSES != len(train_classes):
        logger.info("MODEL.RETINANET.NUM_CLASSES: %d -> %d (from %s)", cfg.MODEL.RETINANET.NUM_CLASSES,
                    len(train_classes), cfg.DATASETS.TRAIN)
        cfg.MODEL.RETINANET.NUM_CLASSES = len(train_classes)
    return cfg
