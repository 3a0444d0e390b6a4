"""Checking a COCO-format dataset before training: its JSON, its images and its boxes.

What is checked, and what happens (`DatasetError` messages name the JSON file and the image id,
annotation id or category at fault, and say what is wrong):

JSON file (always an error)
    missing, empty, not valid JSON, not an object; no "images" or "categories" list; an image entry
    without an integer id, a file_name or positive integer width/height; duplicate image or category
    ids; an annotation without an id, with an image_id that no image has, a category_id that no
    category has, or a bbox that is not 4 finite numbers.

Images (`bad_images`: "error" stops, naming the image; "skip" leaves the image and its annotations
out, with a warning each and the count logged when loading ends)
    a missing or unreadable file, a file that is not an image, a truncated or corrupt image (with
    `check_images="decode"`, the default: every image is decoded whole; "header" reads only the header),
    an image whose size (after its EXIF orientation) differs from the JSON's width and height.
    Grayscale, palette and RGBA images are fine: detectron2's reader converts them to the config's
    INPUT.FORMAT (3 channels; an alpha channel is dropped).

Annotations (training data, with a warning naming each annotation id)
    a box with zero or negative width or height is dropped; a box reaching outside the image is clipped
    to it, and dropped when nothing is left inside. Evaluation reads the ground truth from the JSON
    file itself (pycocotools), as it is.

Images without annotations stay in the dataset: evaluation counts them, and training drops them when
DATALOADER.FILTER_EMPTY_ANNOTATIONS is True (detectron2's default). Category ids need not be
contiguous: detectron2's COCO loader maps them, in increasing id order, to 0..K-1
(`thing_dataset_id_to_contiguous_id` in the metadata), and the class count is K.
"""
import copy
import json
import logging
import math
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError

__all__ = ["DatasetError", "read_coco_json", "check_image", "load_checked_coco", "register_checked_coco",
           "BAD_IMAGE_POLICIES", "IMAGE_CHECKS"]

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
IMAGE_CHECKS = ("decode", "header")
_MAX_WARNINGS = 20  # per kind and dataset; the rest are counted
_POLICIES = {}  # dataset name -> (bad_images, check_images), read when the dataset is loaded
_CACHE = {}


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def read_coco_json(json_file):
    """The parsed COCO-format JSON, its structure checked (see the module docstring)."""
    if not os.path.isfile(json_file):
        raise DatasetError(f"{json_file}: annotation file not found")
    if os.path.getsize(json_file) == 0:
        raise DatasetError(f"{json_file}: the file is empty; a COCO-format JSON object with 'images', "
                           "'annotations' and 'categories' is expected")
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_file}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_file}: cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: a COCO-format file holds a JSON object with 'images', 'annotations' "
                           f"and 'categories', got a JSON {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_file}: '{key}' is missing or not a list")
    if not data["categories"]:
        raise DatasetError(f"{json_file}: 'categories' is empty")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{json_file}: 'annotations' is not a list")

    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DatasetError(f"{json_file}: category #{i} ({cat!r:.80}) needs an integer 'id' and a 'name'")
        if cat["id"] in cat_ids:
            raise DatasetError(f"{json_file}: category id {cat['id']} appears twice")
        cat_ids.add(cat["id"])

    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise DatasetError(f"{json_file}: image #{i} ({img!r:.80}) has no integer 'id'")
        what = f"{json_file}: image id {img['id']}"
        if img["id"] in image_ids:
            raise DatasetError(f"{what} appears twice in 'images'")
        image_ids.add(img["id"])
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DatasetError(f"{what} has no 'file_name'")
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise DatasetError(f"{what} ({img['file_name']}): '{key}' must be a positive integer, "
                                   f"got {img.get(key)!r}")

    ann_ids = set()
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise DatasetError(f"{json_file}: annotation #{i} ({ann!r:.80}) has no integer 'id'")
        what = f"{json_file}: annotation id {ann['id']}"
        if ann["id"] in ann_ids:
            raise DatasetError(f"{what} appears twice")
        ann_ids.add(ann["id"])
        if ann.get("image_id") not in image_ids:
            raise DatasetError(f"{what}: image_id {ann.get('image_id')!r} is not the id of any image")
        if ann.get("category_id") not in cat_ids:
            raise DatasetError(f"{what}: category_id {ann.get('category_id')!r} is not in 'categories' "
                               f"(ids {sorted(cat_ids)})")
        box = ann.get("bbox")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in box)):
            raise DatasetError(f"{what}: 'bbox' must be [x, y, width, height] (4 finite numbers), got {box!r}")
    return data


_EXIF_ORIENTATION = 0x0112


def check_image(path, width, height, check_images="decode"):
    """None when the image at `path` is usable and `width` x `height`, else what is wrong (a phrase)."""
    if not os.path.exists(path):
        return "file not found"
    if not os.path.isfile(path):
        return "not a file"
    try:
        with Image.open(path) as img:
            size = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            if check_images == "decode":
                img.load()
    except UnidentifiedImageError:
        return "not an image file (no image format recognises it)"
    except PermissionError as e:
        return f"cannot be read ({e.strerror})"
    except (OSError, SyntaxError, ValueError) as e:
        return f"truncated or corrupt image ({e})"
    w, h = size
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: detectron2 reads it transposed
        w, h = h, w
    if (w, h) != (width, height):
        return f"its size is {w}x{h} (width x height) but the JSON says {width}x{height}"
    return None


class _Warnings:
    def __init__(self, name):
        self.name, self.counts = name, {}

    def __call__(self, kind, message):
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= _MAX_WARNINGS:
            logger.warning("dataset '%s': %s", self.name, message)
        elif n == _MAX_WARNINGS + 1:
            logger.warning("dataset '%s': more annotations %s; counting them only", self.name, kind)


def _check_boxes(record, warn, counts):
    """Drop boxes of zero or negative size, clip boxes to the image, drop those left empty."""
    W, H = record["width"], record["height"]
    kept = []
    for obj in record["annotations"]:
        x, y, w, h = obj["bbox"]
        ann = f"annotation id {obj.get('id')} of image id {record['image_id']}"
        if w <= 0 or h <= 0:
            counts["dropped (zero or negative size)"] += 1
            warn("with zero or negative size dropped", f"{ann}: bbox {obj['bbox']} has zero or negative "
                 "width or height; dropped")
            continue
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 <= x0 or y1 <= y0:
            counts["dropped (outside the image)"] += 1
            warn("outside the image dropped", f"{ann}: bbox {obj['bbox']} lies outside the {W}x{H} image; dropped")
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["clipped to the image"] += 1
            warn("clipped to the image", f"{ann}: bbox {obj['bbox']} reaches outside the {W}x{H} image; "
                 f"clipped to {[x0, y0, x1 - x0, y1 - y0]}")
            obj = dict(obj, bbox=[x0, y0, x1 - x0, y1 - y0])
        kept.append(obj)
    record["annotations"] = kept


def load_checked_coco(name, json_file, image_root, bad_images="error", check_images="decode"):
    """detectron2's dataset dicts of a COCO-format dataset, after the checks of the module docstring."""
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
    stat = os.stat(json_file)
    key = (name, json_file, image_root, stat.st_mtime_ns, stat.st_size, bad_images, check_images)
    if key not in _CACHE:
        _CACHE[key] = _load_checked(name, json_file, image_root, bad_images, check_images)
    return copy.deepcopy(_CACHE[key])


def _load_checked(name, json_file, image_root, bad_images, check_images):
    read_coco_json(json_file)
    dicts = load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
    warn = _Warnings(name)
    counts = {"dropped (zero or negative size)": 0, "dropped (outside the image)": 0, "clipped to the image": 0}
    kept, skipped = [], []
    for record in dicts:
        problem = check_image(record["file_name"], record["width"], record["height"], check_images)
        if problem:
            what = f"dataset '{name}' ({json_file}): image id {record['image_id']} ({record['file_name']}): {problem}"
            if bad_images == "error":
                raise DatasetError(f"{what}. Fix or remove the image, or set DATASETS.BAD_IMAGES skip "
                                   "to leave bad images out")
            skipped.append(record["image_id"])
            logger.warning("%s; skipped", what)
            continue
        _check_boxes(record, warn, counts)
        kept.append(record)
    if not kept:
        raise DatasetError(f"dataset '{name}' ({json_file}): no usable images"
                           + (f" ({len(skipped)} skipped as bad)" if skipped else ""))
    empty = sum(1 for r in kept if not r["annotations"])
    parts = [f"{len(kept)} images kept"]
    if skipped:
        parts.append(f"{len(skipped)} bad images skipped (ids {skipped[:10]}{' ...' if len(skipped) > 10 else ''})")
    parts += [f"{n} annotations {what}" for what, n in counts.items() if n]
    if empty:
        parts.append(f"{empty} images without annotations (kept; training drops them when "
                     "DATALOADER.FILTER_EMPTY_ANNOTATIONS is True)")
    (logger.warning if skipped or any(counts.values()) else logger.info)(
        "dataset '%s' checked: %s", name, "; ".join(parts))
    return kept


def register_checked_coco(name, json_file, image_root, bad_images="error", check_images="decode"):
    """Register a COCO-format dataset whose dicts come from `load_checked_coco` (evaluated as COCO).

    Registering an existing name again updates its policies (the files must be the caller's concern)."""
    _POLICIES[name] = (bad_images, check_images)
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: load_checked_coco(name, json_file, image_root, *_POLICIES[name]))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
