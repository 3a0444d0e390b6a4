"""Dataset registration and preparation driven by the config: any COCO-format dataset, and the synthetic shapes.

- ``DATASETS.REGISTER``: a list of ``[name, json_file, image_root]``; each is registered as a COCO-format
  dataset whose JSON, images and boxes are checked (``validation.py``; ``DATASETS.BAD_IMAGES``,
  ``DATASETS.CHECK_IMAGES``, ``DATASETS.CHECK_CACHE_DIR``), its class names read from the JSON's categories.
- ``DATASETS.SYNTHETIC``: the names ``synthetic_train`` and ``synthetic_val`` are registered on the
  generated shapes dataset under ``DATASETS.SYNTHETIC.ROOT`` (default ``$DETECTRON2_DATASETS/synthetic``,
  that is ``datasets/synthetic``). Registering does not generate it: `prepare_datasets` does.

`register_datasets(cfg)` registers and sets the heads' class counts (``MODEL.RETINANET.NUM_CLASSES``,
``MODEL.ROI_HEADS.NUM_CLASSES``) to the class count of the training datasets. `prepare_datasets(cfg)`, which training calls before it, generates the synthetic
dataset when it is named and missing, and checks every dataset the config names for training or
testing (on the first process of each machine; the others wait, then read the cached result).
"""
import json
import logging
import os
from typing import List, Optional

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from ..errors import ConfigError, DatasetError
from .synthetic import CLASSES, ensure_synthetic_dataset, split_paths
from .validation import check_coco_dataset, coco_categories, load_checked_coco, raise_unusable

__all__ = ["register_datasets", "prepare_datasets", "register_coco_dataset", "synthetic_root", "dataset_classes",
           "SYNTHETIC_SPLITS"]

logger = logging.getLogger(__name__)

SYNTHETIC_SPLITS = {"synthetic_train": "train", "synthetic_val": "val"}


def synthetic_root(cfg: CfgNode) -> str:
    root = cfg.DATASETS.SYNTHETIC.ROOT
    if not root:
        root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "synthetic")
    return os.path.abspath(root)


def _check_options(cfg):
    """(bad_images, check_images, cache_dir) of the config."""
    return cfg.DATASETS.BAD_IMAGES, cfg.DATASETS.CHECK_IMAGES, cfg.DATASETS.CHECK_CACHE_DIR or None


def _project_datasets(cfg):
    """{name: (json_file, image_root)} of the COCO-format datasets the project registers for `cfg`: those of
    DATASETS.REGISTER and, when DATASETS.TRAIN or DATASETS.TEST names them, the synthetic splits."""
    datasets = {name: (os.path.abspath(j), os.path.abspath(r)) for name, j, r in cfg.DATASETS.REGISTER}
    if (set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)) & set(SYNTHETIC_SPLITS):
        root = synthetic_root(cfg)
        datasets.update({name: split_paths(root, split) for name, split in SYNTHETIC_SPLITS.items()})
    return datasets


def _load_synthetic(name, json_file, image_root, *options):
    if not os.path.isfile(json_file):
        raise DatasetError(
            f"dataset '{name}': the synthetic dataset is not generated under {os.path.dirname(json_file)}: training "
            "(tools/train_net.py, tools/run_synthetic.py) generates it, or run python -m aa_detection.data.synthetic "
            f"--output {os.path.dirname(json_file)}")
    return load_checked_coco(name, json_file, image_root, *options)


def _register(name, json_file, image_root, classes, id_map, load):
    if name in DatasetCatalog.list():
        old = MetadataCatalog.get(name)
        if (old.get("json_file"), old.get("image_root")) != (json_file, image_root):
            logger.info("dataset '%s' was registered on %s, %s; registering it on %s, %s", name,
                        old.get("json_file"), old.get("image_root"), json_file, image_root)
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco",
                                  thing_classes=classes, thing_dataset_id_to_contiguous_id=id_map)


def register_coco_dataset(name: str, json_file: str, image_root: str, bad_images: str = "error",
                          check_images: str = "header", cache_dir: Optional[str] = None) -> List[str]:
    """Register a COCO-format detection dataset under `name` (a name registered before is registered
    again on these files), its dicts from `load_checked_coco`, evaluated as COCO.

    Its ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` metadata come from the cached check,
    else from the JSON; a missing JSON file or image folder, or a malformed JSON, raise DatasetError.
    Returns the list of class names.
    """
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise DatasetError(f"dataset '{name}': annotation file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise DatasetError(f"dataset '{name}': image folder not found: {image_root}")
    classes, id_map = coco_categories(json_file, image_root, check_images, cache_dir)
    _register(name, json_file, image_root, classes, id_map,
              lambda: load_checked_coco(name, json_file, image_root, bad_images, check_images, cache_dir))
    return classes


def _register_synthetic(name, json_file, image_root, *options):
    """Register a synthetic split; its classes are the generator's, so it need not be generated yet."""
    _register(name, json_file, image_root, list(CLASSES), {i + 1: i for i in range(len(CLASSES))},
              lambda: _load_synthetic(name, json_file, image_root, *options))


def dataset_classes(name: str) -> Optional[List[str]]:
    """The class names of a registered dataset: its metadata's thing_classes or, for a COCO-format dataset
    registered without them (detectron2's register_coco_instances), its JSON's categories in id order,
    as detectron2's loader names them; None when neither says."""
    metadata = MetadataCatalog.get(name)
    classes = metadata.get("thing_classes")
    if classes is None and os.path.isfile(metadata.get("json_file", "")):
        with open(metadata.json_file) as f:
            categories = json.load(f).get("categories") or []
        classes = [c["name"] for c in sorted(categories, key=lambda c: c["id"])] or None
    return list(classes) if classes is not None else None


# The class counts of the detectors' heads that follow the training datasets' classes.
CLASS_COUNT_KEYS = ("MODEL.RETINANET.NUM_CLASSES", "MODEL.ROI_HEADS.NUM_CLASSES")


def register_datasets(cfg: CfgNode) -> CfgNode:
    """Register the datasets `cfg` asks for and set the heads' class counts (CLASS_COUNT_KEYS: RetinaNet's,
    the R-CNN ROI heads') from its training datasets' classes; `cfg` must be mutable. Generates and loads nothing.

    A name in DATASETS.TRAIN or DATASETS.TEST that is not registered raises ConfigError; training
    datasets with different classes, or a test dataset with other classes, raise DatasetError."""
    options = _check_options(cfg)
    for name, (json_file, image_root) in _project_datasets(cfg).items():
        if name in SYNTHETIC_SPLITS:
            _register_synthetic(name, json_file, image_root, *options)
        else:
            register_coco_dataset(name, json_file, image_root, *options)

    registered = set(DatasetCatalog.list())
    for key in ("DATASETS.TRAIN", "DATASETS.TEST"):
        missing = [n for n in cfg.DATASETS[key.split(".")[1]] if n not in registered]
        if missing:
            raise ConfigError(f"{key} names {missing}, which are not registered datasets: register a COCO-format "
                              "dataset with --dataset NAME JSON IMAGE_ROOT or DATASETS.REGISTER, or use "
                              f"synthetic_train, synthetic_val or a detectron2 builtin name")
    train_classes = None
    for name in cfg.DATASETS.TRAIN:
        classes = dataset_classes(name)
        if classes is None:
            raise DatasetError(
                f"DATASETS.TRAIN: the classes of '{name}' are unknown (its MetadataCatalog entry has neither "
                f"thing_classes nor a COCO json_file), so {' and '.join(CLASS_COUNT_KEYS)} cannot follow them: set "
                f"MetadataCatalog.get('{name}').thing_classes when registering it")
        if train_classes is not None and classes != train_classes:
            raise DatasetError(f"the training datasets {list(cfg.DATASETS.TRAIN)} disagree on their classes: "
                               f"'{name}' has {classes}, the ones before it {train_classes}")
        train_classes = classes
    for name in cfg.DATASETS.TEST:
        classes = dataset_classes(name)
        if train_classes is not None and classes is not None and classes != train_classes:
            raise DatasetError(f"test dataset '{name}' has classes {classes}, the training datasets "
                               f"{list(cfg.DATASETS.TRAIN)} have {train_classes}: DATASETS.TEST must name "
                               "datasets with the training datasets' categories")
    for key in CLASS_COUNT_KEYS:
        node = cfg.MODEL[key.split(".")[1]]
        if train_classes is not None and node.NUM_CLASSES != len(train_classes):
            logger.info("%s: %d -> %d (from %s)", key, node.NUM_CLASSES, len(train_classes), list(cfg.DATASETS.TRAIN))
            node.NUM_CLASSES = len(train_classes)
    return cfg


def prepare_datasets(cfg: CfgNode) -> None:
    """Make the datasets `cfg` trains and tests on ready: generate the synthetic dataset when it is named
    and missing, and check every project dataset named in DATASETS.TRAIN or DATASETS.TEST, raising
    DatasetError as loading would (bad images with DATASETS.BAD_IMAGES "error", no usable image).

    Runs on the first process of each machine, the other processes wait for it; the checks are cached
    on disk (see `validation.py`), so they run once per version of the files, not once per process
    or run. Call it before `register_datasets`, which then reads the class names from the cache."""
    if comm.get_local_rank() == 0:
        named = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
        if named & set(SYNTHETIC_SPLITS):
            syn = cfg.DATASETS.SYNTHETIC
            ensure_synthetic_dataset(synthetic_root(cfg), syn.NUM_TRAIN, syn.NUM_VAL, syn.SEED)
        bad_images, check_images, cache_dir = _check_options(cfg)
        for name, (json_file, image_root) in _project_datasets(cfg).items():
            if name in named:
                summary, _ = check_coco_dataset(name, json_file, image_root, check_images, cache_dir,
                                                with_records=False)
                raise_unusable(name, json_file, summary, bad_images)
    comm.synchronize()
