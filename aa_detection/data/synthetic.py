"""A deterministic synthetic detection dataset in COCO format, generated on disk without any download.

Each image is a textured, noisy background with distractor strokes and 1-8 objects of five shape
classes (rectangle, ellipse, triangle, cross, ring) in random colours, sizes from about 10 px to about
half the image (images are 128 to 192 px a side), placed so that later objects may partly occlude
earlier ones. Colour carries no class information: the detector has to learn shape. Boxes, areas and
masks are exact: each annotation's `segmentation` is its object's own drawn mask as COCO run-length
encoding (pycocotools), its box that mask's extent and its area the mask's pixel count (amodal: the
whole shape, also where a later object covers it).

The dataset is a pure function of its arguments (seed, sizes, counts): generating it twice gives the
same bytes. It is written to a temporary folder first and renamed into place, so an interrupted
generation never leaves a half-written dataset behind.
"""
import json
import os
import shutil
import tempfile
from typing import Callable, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_util

from ..errors import DatasetError

__all__ = ["CLASSES", "generate_split", "ensure_synthetic_dataset", "split_paths", "generate_once"]

CLASSES = ("rectangle", "ellipse", "triangle", "cross", "ring")
_VERSION = 2  # bump when the generator's output changes (2: masks)


def _background(rng, h, w):
    """A smooth colour gradient with low-frequency blobs and pixel noise, as float32 HxWx3."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1.0) / 2.0
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    low = rng.normal(0, 25, size=(max(h // 24, 2), max(w // 24, 2), 3)).astype(np.float32)
    img += cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, rng.uniform(4, 14), size=(h, w, 3))
    return img


def _distractors(rng, img):
    """Lines, arcs and specks that are not objects."""
    h, w = img.shape[:2]
    for _ in range(rng.integers(2, 7)):
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        kind = rng.integers(3)
        if kind == 0:
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p1, p2, color, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 1:
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            r = int(rng.integers(6, max(w, h) // 3))
            a0 = float(rng.uniform(0, 360))
            cv2.ellipse(img, c, (r, r), 0, a0, a0 + float(rng.uniform(30, 120)), color, 1, cv2.LINE_AA)
        else:
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(img, c, int(rng.integers(1, 3)), color, -1, cv2.LINE_AA)


def _shape_mask(cls, size, rng):
    """A uint8 mask (about size x size, cropped to its extent) of one shape of class index `cls`."""
    aspect = float(np.exp(rng.uniform(-0.5, 0.5)))
    w = max(int(round(size * np.sqrt(aspect))), 6)
    h = max(int(round(size / np.sqrt(aspect))), 6)
    pad = 2
    m = np.zeros((h + 2 * pad, w + 2 * pad), np.uint8)
    x0, y0, x1, y1 = pad, pad, pad + w - 1, pad + h - 1
    thick = max(int(round(min(w, h) * rng.uniform(0.18, 0.3))), 2)
    name = CLASSES[cls]
    if name == "rectangle":
        cv2.rectangle(m, (x0, y0), (x1, y1), 1, -1)
    elif name == "ellipse":
        cv2.ellipse(m, (((x0 + x1) / 2, (y0 + y1) / 2), (w, h), 0.0), 1, -1)
    elif name == "triangle":
        apex = x0 + rng.uniform(0.2, 0.8) * (x1 - x0)
        pts = np.array([[apex, y0], [x1, y1], [x0, y1]], np.float32)
        if rng.random() < 0.5:  # pointing down
            pts[:, 1] = y0 + y1 - pts[:, 1]
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    elif name == "cross":
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        cv2.rectangle(m, (cx - thick // 2, y0), (cx - thick // 2 + thick - 1, y1), 1, -1)
        cv2.rectangle(m, (x0, cy - thick // 2), (x1, cy - thick // 2 + thick - 1), 1, -1)
    elif name == "ring":
        cv2.ellipse(m, (((x0 + x1) / 2, (y0 + y1) / 2), (w, h), 0.0), 1, -1)
        inner = (max(w - 2 * thick, 2), max(h - 2 * thick, 2))
        cv2.ellipse(m, (((x0 + x1) / 2, (y0 + y1) / 2), inner, 0.0), 0, -1)
    ys, xs = np.nonzero(m)
    return m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _rle(mask, x, y, height, width):
    """COCO run-length encoding of `mask` placed at (x, y) in a height x width image."""
    full = np.zeros((height, width), np.uint8, order="F")
    full[y : y + mask.shape[0], x : x + mask.shape[1]] = mask
    rle = mask_util.encode(full)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _make_image(rng, h, w, max_objects, min_size, max_size):
    img = _background(rng, h, w)
    _distractors(rng, img)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(len(CLASSES)))
            size = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
            mask = _shape_mask(cls, size, rng)
            mh, mw = mask.shape
            if mh >= h or mw >= w:
                continue
            x, y = int(rng.integers(0, w - mw + 1)), int(rng.integers(0, h - mh + 1))
            box = (x, y, x + mw, y + mh)
            if all(_iou(box, o["box"]) < 0.2 for o in objects):
                break
        else:
            continue
        # a colour that stands out from the local background, with slight shading
        local = img[y : y + mh, x : x + mw].reshape(-1, 3).mean(0)
        color = rng.uniform(0, 255, 3)
        while np.abs(color - local).sum() < 150:
            color = rng.uniform(0, 255, 3)
        shade = 1.0 + rng.normal(0, 0.06, size=(mh, mw, 1))
        region = img[y : y + mh, x : x + mw]
        sel = mask.astype(bool)
        region[sel] = (color[None, None] * shade)[sel]
        objects.append({"cls": cls, "box": box, "area": float(sel.sum()), "mask": mask})
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def generate_split(out_dir: str, split: str, num_images: int, seed: int = 0, image_size: Tuple[int, int] = (128, 192),
                   max_objects: int = 8, min_size: int = 10, max_size: Optional[int] = None) -> dict:
    """Write `num_images` images of one split to `out_dir/split/` and its COCO JSON to
    `out_dir/split.json`. Image sizes (h, w) are drawn from the multiples of 32 in `image_size`."""
    lo, hi = image_size
    sizes = list(range(lo, hi + 1, 32)) or [lo]
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    split_id = sum(ord(c) for c in split)
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_id, i])
        h, w = int(rng.choice(sizes)), int(rng.choice(sizes))
        top = max_size or min(h, w) / 2
        img, objects = _make_image(rng, h, w, max_objects, min_size, top)
        file_name = f"{i:06d}.png"
        cv2.imwrite(os.path.join(img_dir, file_name), img)
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": o["cls"] + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": o["area"], "iscrowd": 0,
                "segmentation": _rle(o["mask"], x0, y0, h, w),
            })
    coco = {
        "info": {"description": f"aa_detection synthetic shapes v{_VERSION}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CLASSES)],
    }
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(coco, f)
    return coco


def split_paths(root: str, split: str) -> Tuple[str, str]:
    """(json_file, image_root) of one split of a dataset generated under `root`."""
    return os.path.join(root, f"{split}.json"), os.path.join(root, split)


def _move_into_place(tmp: str, root: str) -> None:
    """Rename the finished folder `tmp` (DONE stamp written) to `root`. A `root` that another process
    finished meanwhile is kept; a stale incomplete one (no DONE stamp) is replaced."""
    try:
        os.rename(tmp, root)
    except OSError:
        if not os.path.isfile(os.path.join(root, "DONE")):
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)


def _is_generated(root: str, arguments: dict) -> bool:
    """Whether `root` holds a finished generated set (its DONE stamp), made with `arguments` (the stamp's
    entries; those set to None are not compared). DatasetError naming the entries when it was made with
    other values."""
    stamp = os.path.join(root, "DONE")
    if not os.path.isfile(stamp):
        return False
    with open(stamp) as f:
        made = json.load(f)
    differ = [f"{k} {made.get(k)} (asked {v})" for k, v in arguments.items() if v is not None and made.get(k) != v]
    if differ:
        raise DatasetError(f"{root} holds a set generated with other arguments: {', '.join(differ)}; "
                           "remove it or choose another folder")
    return True


def generate_once(root: str, arguments: dict, generate: Callable[[str], dict]) -> str:
    """The absolute `root`, generated by `generate(folder)` unless it already holds a finished set made with
    `arguments` (a set made with other values is a DatasetError naming them; None values are not compared).

    `generate` fills a temporary sibling folder and returns entries to record beside `arguments` in its
    DONE stamp; the folder is then renamed to `root`, so concurrent or interrupted runs never see a
    partial set.
    """
    root = os.path.abspath(root)
    if _is_generated(root, arguments):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
    try:
        stamp = {**arguments, **generate(tmp)}
        with open(os.path.join(tmp, "DONE"), "w") as f:
            json.dump(stamp, f)
        _move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_synthetic_dataset(root: str, num_train: int = 800, num_val: int = 200, seed: int = 0,
                             image_size: Optional[Tuple[int, int]] = None) -> str:
    """Generate the train and val splits under `root` unless they are already there (idempotent); a set
    there made with other arguments is a DatasetError. image_size: (min, max) side, default (128, 192);
    None also accepts a set there of any size. Generated as `generate_once` does; returns the absolute `root`.
    """
    arguments = {"version": _VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
                 "image_size": list(image_size) if image_size else None}

    def generate(folder):
        size = image_size or (128, 192)
        generate_split(folder, "train", num_train, seed=seed, image_size=size)
        generate_split(folder, "val", num_val, seed=seed, image_size=size)
        return {"image_size": list(size)}

    return generate_once(root, arguments, generate)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Generate the synthetic shapes dataset (COCO format).")
    p.add_argument("--output", default="datasets/synthetic")
    p.add_argument("--num-train", type=int, default=800)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(ensure_synthetic_dataset(a.output, a.num_train, a.num_val, a.seed))
