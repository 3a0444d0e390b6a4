"""An ImageFolder classification set cut from the synthetic shapes: one crop per object.

    root/train/<class>/<image>_<object>.png
    root/val/<class>/<image>_<object>.png

Each crop is an object's box widened by a margin on every side, from images of the synthetic
detection dataset (`aa_detection.data.synthetic`, generated for each split with its own seed), so the
classifier sees the backgrounds, distractors, colours and occlusions the detector will see. With the
defaults the training crops come from the detection set's 800 training images (the same seed, the same
images) and the validation crops from the first 50 of its validation images. Classes
are the five shape classes (SYNTHETIC_CLASSES); crops of a shape partly covered by a later one keep
their label. Like the detection set it is a pure function of its arguments, written to a temporary
folder and renamed into place.
"""
import json
import os
import shutil

import cv2

from .synthetic import CLASSES, generate_once, generate_split

__all__ = ["ensure_shapes_classification_set"]


def _write_crops(detection_root: str, split: str, out_dir: str, margin: float, min_side: int) -> int:
    with open(os.path.join(detection_root, f"{split}.json")) as f:
        coco = json.load(f)
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    for name in CLASSES:
        os.makedirs(os.path.join(out_dir, split, name), exist_ok=True)
    count = 0
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        if max(w, h) < min_side:
            continue
        image = cv2.imread(os.path.join(detection_root, split, files[ann["image_id"]]))
        pad = int(round(margin * max(w, h)))
        crop = image[max(0, y - pad): y + h + pad, max(0, x - pad): x + w + pad]
        name = CLASSES[ann["category_id"] - 1]
        cv2.imwrite(os.path.join(out_dir, split, name, f"{ann['image_id']:06d}_{ann['id']:06d}.png"), crop)
        count += 1
    return count


def ensure_shapes_classification_set(root: str, num_train_images: int = 800, num_val_images: int = 50,
                                     seed: int = 0, margin: float = 0.15, min_side: int = 12) -> str:
    """Generate the set under `root` unless it is there (`generate_once`); returns the absolute `root`. A set
    made there with other arguments is a DatasetError naming them.

    num_*_images detection images per split (1-8 objects each) are cut into crops: each object's box
    plus `margin` times its longer side on every side; objects shorter than `min_side` px are skipped.
    """
    arguments = {"seed": seed, "num_train_images": num_train_images, "num_val_images": num_val_images,
                 "margin": margin, "min_side": min_side}

    def generate(folder):
        counts = {}
        for split, num_images in (("train", num_train_images), ("val", num_val_images)):
            detection = os.path.join(folder, "detection")
            generate_split(detection, split, num_images, seed=seed)  # images differ per split
            counts[split] = _write_crops(detection, split, folder, margin, min_side)
            shutil.rmtree(detection)
        return {"classes": list(CLASSES), "crops": counts}

    return generate_once(root, arguments, generate)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Generate the synthetic shapes classification set (ImageFolder).")
    p.add_argument("--output", default="datasets/shapes_cls")
    p.add_argument("--num-train-images", type=int, default=800)
    p.add_argument("--num-val-images", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(ensure_shapes_classification_set(a.output, a.num_train_images, a.num_val_images, a.seed))
