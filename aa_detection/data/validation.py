"""Checking a COCO-format dataset: its JSON, its images and its boxes, once per version of its files.

What is checked, and what happens (`DatasetError` messages name the JSON file and the image id,
annotation id or category at fault, and say what is wrong):

JSON file (always an error)
    missing, empty, not valid JSON, not an object; no "images" or "categories" list; an image entry
    without an integer id, a file_name or positive integer width/height; duplicate image or category
    ids; an annotation without an id, with an image_id that no image has, a category_id that no
    category has, a bbox that is not 4 finite numbers, or a segmentation that is neither polygons (a
    list of lists of at least 6 coordinates) nor run-length encoding (a dict with "size" and "counts").

Images (`bad_images`: "error" stops, naming the image; "skip" leaves the image and its annotations
out, with a warning each and the count logged when loading ends)
    a missing or unreadable file, a file that is not an image, an image whose size (after its EXIF
    orientation) differs from the JSON's width and height; with `check_images="decode"` also a
    truncated or corrupt image (every image is decoded whole; the default "header" reads only each
    file's header, and a PNG's EXIF orientation only when it comes before the pixel data).
    Grayscale, palette and RGBA images are fine: detectron2's reader converts them to the config's
    INPUT.FORMAT (3 channels; an alpha channel is dropped).

Annotations (training data, with a warning naming each annotation id)
    a box with zero or negative width or height is dropped; a box reaching outside the image is clipped
    to it, and dropped when nothing is left inside. Evaluation reads the ground truth from the JSON
    file itself (pycocotools), as it is.

Images without annotations stay in the dataset: evaluation counts them, and training drops them when
DATALOADER.FILTER_EMPTY_ANNOTATIONS is True (detectron2's default). Category ids need not be
contiguous: they map, in increasing id order, to 0..K-1 (`thing_dataset_id_to_contiguous_id` in the
metadata, as detectron2's COCO loader does), and the class count is K. The dataset dicts hold boxes
and, where the JSON has them, masks (`segmentation`, for Mask R-CNN; polygons or RLE as written, so
INPUT.MASK_FORMAT "bitmask" for RLE); no keypoints.

Once per version: `check_coco_dataset` parses the JSON once, builds the dataset dicts, checks every
image (with a progress bar when that takes more than a few seconds) and writes the result to a cache
file, one per JSON file, image folder and `check_images`: its first line is a summary (categories, bad
images, counts), its second the dicts of the usable images. While the JSON file (path, size,
modification time) and the image folder (path, modification time) are unchanged, later checks and
loads read that file instead, in any process. An image changed in place, with the folder and the JSON
untouched, is not seen: delete the cache file (or touch the JSON file) to check again. Nothing is kept
in memory between loads.
"""
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional, Tuple

from detectron2.structures import BoxMode
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import DatasetError
from ..safe_io import atomic_write

__all__ = ["DatasetError", "read_coco_json", "check_image", "check_coco_dataset", "cached_check", "coco_categories",
           "raise_unusable", "load_checked_coco", "default_cache_dir", "BAD_IMAGE_POLICIES", "IMAGE_CHECKS"]

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
IMAGE_CHECKS = ("header", "decode")
_MAX_WARNINGS = 20  # per kind and dataset; the rest are counted
_CACHE_VERSION = 2  # bump when the check or the cache file changes (2: masks)
_PROGRESS_AFTER_SECONDS = 2.0


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def read_coco_json(json_file: str) -> dict:
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

    image_ids, sizes = set(), {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise DatasetError(f"{json_file}: image #{i} ({img!r:.80}) has no integer 'id'")
        what = f"{json_file}: image id {img['id']}"
        if img["id"] in image_ids:
            raise DatasetError(f"{what} appears twice in 'images'")
        image_ids.add(img["id"])
        sizes[img["id"]] = [img.get("height"), img.get("width")]
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
        if "segmentation" in ann and not _is_segmentation(ann["segmentation"], sizes[ann["image_id"]]):
            raise DatasetError(f"{what}: 'segmentation' must be polygons (lists of at least 6 coordinates) or "
                               f"run-length encoding of the image's size {sizes[ann['image_id']]} (a dict with "
                               f"'size' and 'counts'), got {ann['segmentation']!r:.80}")
    return data


def _is_segmentation(segm, size) -> bool:
    if isinstance(segm, dict):
        return {"size", "counts"} <= set(segm) and list(segm["size"]) == size
    return isinstance(segm, list) and bool(segm) and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in segm)


_EXIF_ORIENTATION = 0x0112


def check_image(path: str, width: int, height: int, check_images: str = "header") -> Optional[str]:
    """None when the image at `path` is usable and `width` x `height`, else what is wrong (a phrase).

    "header" reads the file's header only; "decode" also decodes the whole image (finds truncation)."""
    try:
        with Image.open(path) as img:
            if check_images == "decode":
                img.load()
            size = img.size
            # a PNG's EXIF may follow the pixel data, and Pillow decodes the image to reach it: the
            # header check reads it only when it came with the header
            has_exif = img.format != "PNG" or "exif" in img.info
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if has_exif else 1
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "not a file"
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


def _records(data, image_root):
    """detectron2's dataset dicts of a parsed COCO JSON (boxes, masks; contiguous category ids; no bbox_mode)."""
    id_map = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    by_image = {}
    for ann in data.get("annotations", []):
        obj = {"id": ann["id"], "bbox": ann["bbox"], "category_id": id_map[ann["category_id"]],
               "iscrowd": ann.get("iscrowd", 0)}
        if "segmentation" in ann:
            obj["segmentation"] = _compressed(ann["segmentation"])
        by_image.setdefault(ann["image_id"], []).append(obj)
    records = [{"file_name": os.path.join(image_root, img["file_name"]), "height": img["height"],
                "width": img["width"], "image_id": img["id"], "annotations": by_image.get(img["id"], [])}
               for img in data["images"]]
    return records


def _compressed(segm):
    """Polygons and compressed RLE as they are; uncompressed RLE (counts a list) compressed, as
    detectron2's COCO loader does, with the counts as a string (the form the cache file can hold)."""
    if isinstance(segm, dict) and isinstance(segm["counts"], list):
        from pycocotools import mask as mask_util

        rle = mask_util.frPyObjects(segm, *segm["size"])
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return segm


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


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/aa_detection/dataset_checks, ~/.cache/aa_detection/dataset_checks without it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aa_detection", "dataset_checks")


def _cache_key(json_file, image_root, check_images):
    json_stat = os.stat(json_file)
    root_stat = os.stat(image_root) if os.path.isdir(image_root) else None
    return {"version": _CACHE_VERSION, "json_file": os.path.realpath(json_file), "json_size": json_stat.st_size,
            "json_mtime_ns": json_stat.st_mtime_ns, "image_root": os.path.realpath(image_root),
            "image_root_mtime_ns": root_stat.st_mtime_ns if root_stat else None, "check_images": check_images}


def _cache_file(key, cache_dir):
    slot = hashlib.sha1(f"{key['json_file']}\0{key['image_root']}\0{key['check_images']}".encode()).hexdigest()
    stem = os.path.splitext(os.path.basename(key["json_file"]))[0]
    return os.path.join(cache_dir or default_cache_dir(), f"{stem}-{slot[:16]}.json")


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector while many small acyclic objects are built: with torch
    loaded, its full passes, triggered by the allocations, scan millions of objects each (on 20,000
    images they took most of the loading time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def cached_check(json_file: str, image_root: str, check_images: str = "header", cache_dir: Optional[str] = None,
                 with_records: bool = True) -> Optional[Tuple[dict, Optional[List[dict]]]]:
    """(summary, dataset dicts or None) of the cached check of these files, or None when there is no
    cache file for their current version. `with_records=False` reads the summary line only."""
    try:
        key = _cache_key(json_file, image_root, check_images)
        with open(_cache_file(key, cache_dir)) as f, _gc_paused():
            summary = json.loads(f.readline())
            if summary.get("key") != key:
                return None
            if not with_records:
                return summary, None
            return summary, _unpack(json.loads(f.readline()))
    except (OSError, ValueError):
        return None


# The cache file holds the dicts as rows, [image_id, file_name, height, width, [[id, x, y, w, h, category_id,
# iscrowd, segmentation or null], ...]]: JSON arrays parse several times faster than the same dicts.
def _pack(records):
    return [[r["image_id"], r["file_name"], r["height"], r["width"],
             [[a["id"], *a["bbox"], a["category_id"], a["iscrowd"], a.get("segmentation")]
              for a in r["annotations"]]] for r in records]


def _annotation(a, x, y, w, h, c, z, segm):
    obj = {"id": a, "bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": c, "iscrowd": z}
    if segm is not None:
        obj["segmentation"] = segm
    return obj


def _unpack(rows):
    return [{"file_name": file_name, "height": height, "width": width, "image_id": image_id,
             "annotations": [_annotation(*a) for a in anns]}
            for image_id, file_name, height, width, anns in rows]


def check_coco_dataset(name: str, json_file: str, image_root: str, check_images: str = "header",
                       cache_dir: Optional[str] = None, with_records: bool = True
                       ) -> Tuple[dict, Optional[List[dict]]]:
    """(summary, dataset dicts of the usable images) of a COCO-format dataset: read from its cache file,
    else checked (see the module docstring) and written there. `name` is used in the messages only.

    summary: {"categories": [[id, name], ...] by id, "num_images", "bad_images": [[image id, file, problem],
    ...], "box_counts": {what: count}, "empty_images": count}. Malformed JSON raises DatasetError."""
    cached = cached_check(json_file, image_root, check_images, cache_dir, with_records)
    if cached is not None:
        return cached
    if not os.path.isfile(json_file):
        raise DatasetError(f"dataset '{name}': annotation file not found: {json_file}")
    key = _cache_key(json_file, image_root, check_images)  # before reading: a change meanwhile is seen next time
    start = time.perf_counter()
    with _gc_paused():
        data = read_coco_json(json_file)
        records = _records(data, image_root)
    categories = [[c["id"], c["name"]] for c in sorted(data["categories"], key=lambda c: c["id"])]
    del data
    logger.info("dataset '%s': checking %d images (%s) of %s", name, len(records), check_images, json_file)
    warn = _Warnings(name)
    counts = {"dropped (zero or negative size)": 0, "dropped (outside the image)": 0, "clipped to the image": 0}
    kept, bad = [], []
    progress = tqdm(records, desc=f"checking the images of '{name}'", unit="image", leave=False,
                    delay=_PROGRESS_AFTER_SECONDS)
    for record in progress:
        problem = check_image(record["file_name"], record["width"], record["height"], check_images)
        if problem:
            bad.append([record["image_id"], record["file_name"], problem])
            continue
        _check_boxes(record, warn, counts)
        kept.append(record)
    summary = {"key": key, "categories": categories, "num_images": len(records), "bad_images": bad,
               "box_counts": counts, "empty_images": sum(1 for r in kept if not r["annotations"])}
    _write_cache(_cache_file(key, cache_dir), summary, kept)
    logger.info("dataset '%s': checked in %.1f s", name, time.perf_counter() - start)
    for record in kept:
        for ann in record["annotations"]:
            ann["bbox_mode"] = BoxMode.XYWH_ABS
    return summary, kept if with_records else None


def _write_cache(path, summary, records):
    try:
        with atomic_write(path, "w") as f:
            f.write(json.dumps(summary) + "\n")
            json.dump(_pack(records), f, separators=(",", ":"))
            f.write("\n")
    except OSError as e:
        logger.warning("cannot write the dataset check cache %s (%s); the check runs again next time", path, e)


def coco_categories(json_file: str, image_root: str, check_images: str = "header",
                    cache_dir: Optional[str] = None) -> Tuple[List[str], Dict[int, int]]:
    """(class names, {dataset category id: contiguous id}) of a COCO-format dataset, in increasing id
    order: from its cached check when there is one, else from the JSON (checked; DatasetError)."""
    cached = cached_check(json_file, image_root, check_images, cache_dir, with_records=False)
    if cached is not None:
        categories = cached[0]["categories"]
    else:
        categories = [[c["id"], c["name"]] for c in sorted(read_coco_json(json_file)["categories"],
                                                           key=lambda c: c["id"])]
    return [n for _, n in categories], {cat_id: i for i, (cat_id, _) in enumerate(categories)}


def raise_unusable(name: str, json_file: str, summary: dict, bad_images: str = "error") -> None:
    """DatasetError when the checked dataset has bad images and `bad_images` is "error", or no usable image."""
    bad = summary["bad_images"]
    if bad and bad_images == "error":
        image_id, file_name, problem = bad[0]
        more = f" ({len(bad) - 1} more bad images)" if len(bad) > 1 else ""
        raise DatasetError(f"dataset '{name}' ({json_file}): image id {image_id} ({file_name}): {problem}{more}. "
                           "Fix or remove the image, or set DATASETS.BAD_IMAGES skip to leave bad images out")
    if len(bad) == summary["num_images"]:
        raise DatasetError(f"dataset '{name}' ({json_file}): no usable images"
                           + (f" ({len(bad)} skipped as bad)" if bad else ""))


def load_checked_coco(name: str, json_file: str, image_root: str, bad_images: str = "error",
                      check_images: str = "header", cache_dir: Optional[str] = None) -> List[dict]:
    """detectron2's dataset dicts of a COCO-format dataset, after the checks of the module docstring
    (read from the cache file while the files are unchanged)."""
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
    summary, records = check_coco_dataset(name, json_file, image_root, check_images, cache_dir)
    raise_unusable(name, json_file, summary, bad_images)
    bad = summary["bad_images"]
    for image_id, file_name, problem in bad[:_MAX_WARNINGS]:
        logger.warning("dataset '%s' (%s): image id %s (%s): %s; skipped", name, json_file, image_id, file_name,
                       problem)
    parts = [f"{len(records)} images kept"]
    if bad:
        ids = [b[0] for b in bad]
        parts.append(f"{len(bad)} bad images skipped (ids {ids[:10]}{' ...' if len(ids) > 10 else ''})")
    counts = summary["box_counts"]
    parts += [f"{n} annotations {what}" for what, n in counts.items() if n]
    if summary["empty_images"]:
        parts.append(f"{summary['empty_images']} images without annotations (kept; training drops them when "
                     "DATALOADER.FILTER_EMPTY_ANNOTATIONS is True)")
    (logger.warning if bad or any(counts.values()) else logger.info)(
        "dataset '%s' checked: %s", name, "; ".join(parts))
    return records
