"""Drawing detections and ground truth with detectron2's Visualizer, and a DefaultPredictor for one image.

Colours are fixed per class (detectron2's colour map indexed by the class id), so the same class has
the same colour in a prediction, in the ground truth beside it and in another model's picture.
"""
import glob
import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data import detection_utils
from detectron2.engine import DefaultPredictor
from detectron2.structures import BoxMode, Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer

from ..checkpoint import AACheckpointer
from ..errors import InputError
from ..safe_io import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS", "InputError", "ModelRunner", "class_names", "draw_boxes", "draw_ground_truth",
    "draw_predictions", "expand_inputs", "instances_to_arrays", "label_image", "read_image", "side_by_side",
    "write_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_PALETTE = colormap(rgb=True, maximum=1)


def expand_inputs(items: List[str]) -> List[str]:
    """Image paths from files, folders and glob patterns (the images of a folder or a pattern's matches,
    sorted); InputError naming a folder or pattern without images. An item that exists is a file or a
    folder, even with * ? [ in its name; other items without those are files (reading them reports them)."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif not os.path.exists(item) and any(c in item for c in "*?["):
            found = sorted(p for p in glob.glob(os.path.expanduser(item)) if p.lower().endswith(IMAGE_EXTENSIONS))
        else:
            found = [item]
        if not found:
            raise InputError(f"--input {item}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
        paths += found
    return paths


def read_image(path: str, fmt: str = "BGR") -> np.ndarray:
    """The image at `path` as an HxWx3 uint8 array in `fmt` ("BGR" or "RGB"); InputError naming the file
    when it is missing or cannot be decoded."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        image = detection_utils.read_image(path, format=fmt)
    except Exception as e:  # PIL raises several types for corrupt or truncated files
        raise InputError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from e
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{path}: decoded to an empty image of shape {image.shape}")
    return np.ascontiguousarray(image)


def to_rgb(image: np.ndarray, fmt: str) -> np.ndarray:
    """An HxWx3 image in `fmt` ("BGR" or "RGB") as RGB."""
    return image[:, :, ::-1] if fmt == "BGR" else image


def write_image(path: str, rgb: np.ndarray, quality: int = 92) -> str:
    """Encode an RGB uint8 image by the extension of `path` (.jpg/.jpeg/.png) and write it atomically."""
    ext = os.path.splitext(path)[1].lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(ext, np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode images as '{ext}'")
    with atomic_write(path) as f:
        f.write(data.tobytes())
    return path


def class_names(metadata: Optional[Metadata], num_classes: Optional[int] = None) -> List[str]:
    """Class names from dataset metadata (`thing_classes`), else "class 0", "class 1", ..."""
    names = metadata.get("thing_classes", None) if metadata is not None else None
    if names:
        return list(names)
    return [f"class {i}" for i in range(num_classes or 0)]


def _class_color(c):
    return tuple(_PALETTE[int(c) % len(_PALETTE)])


def _fit(image, height, width):
    """matplotlib may round the canvas by a pixel: make the drawing exactly height x width."""
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image


def draw_boxes(image_rgb: np.ndarray, boxes: Sequence, classes: Sequence[int], names: Sequence[str],
               scores: Optional[Sequence[float]] = None, scale: float = 1.0,
               masks: Optional[Sequence] = None) -> np.ndarray:
    """Boxes (N, 4) XYXY in the image's pixels, labelled "<class> <score>%", and their `masks` when given
    (N binary H x W arrays, COCO RLE dicts or polygon lists), drawn by detectron2's Visualizer. Returns an
    RGB uint8 image of round(scale * H) x round(scale * W)."""
    h, w = image_rgb.shape[:2]
    vis = Visualizer(image_rgb, metadata=None, scale=scale)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes):
        labels = []
        for i, c in enumerate(classes):
            name = names[int(c)] if 0 <= int(c) < len(names) else f"class {int(c)}"
            labels.append(name if scores is None else f"{name} {100 * float(scores[i]):.0f}%")
        out = vis.overlay_instances(boxes=boxes, labels=labels, masks=masks,
                                    assigned_colors=[_class_color(c) for c in classes])
    else:
        out = vis.output
    return _fit(out.get_image(), int(round(h * scale)), int(round(w * scale)))


def instances_to_arrays(instances: Instances, threshold: float = 0.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (N, 4) XYXY, scores (N,), classes (N,)) of detectron2 Instances scoring >= threshold,
    highest score first."""
    instances = instances.to("cpu")
    keep = _kept(instances, threshold)
    return (instances.pred_boxes.tensor.numpy()[keep], instances.scores.numpy()[keep],
            instances.pred_classes.numpy()[keep])


def _kept(instances: Instances, threshold: float) -> np.ndarray:
    """Indices of the instances scoring >= threshold, highest score first."""
    scores = instances.scores.numpy()
    keep = np.flatnonzero(scores >= threshold)
    return keep[np.argsort(-scores[keep], kind="stable")]


def draw_predictions(image_rgb: np.ndarray, instances: Instances, names: Sequence[str], threshold: float = 0.5,
                     scale: float = 1.0) -> np.ndarray:
    """The detections of `instances` scoring at least `threshold`, with class names, scores and, for an
    instance segmentation model, their masks."""
    instances = instances.to("cpu")
    kept = instances[torch.from_numpy(_kept(instances, threshold))]
    boxes, scores, classes = instances_to_arrays(kept)
    masks = kept.pred_masks.numpy() if kept.has("pred_masks") else None
    return draw_boxes(image_rgb, boxes, classes, names, scores, scale=scale, masks=masks)


def draw_ground_truth(image_rgb: np.ndarray, dataset_dict: dict, names: Sequence[str],
                      scale: float = 1.0) -> np.ndarray:
    """The annotations of a detectron2 dataset dict (its `annotations` list), crowd boxes included, with
    their masks when every annotation has one (`segmentation`: RLE or polygons)."""
    annos = dataset_dict.get("annotations", [])
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    classes = [a["category_id"] for a in annos]
    masks = [a["segmentation"] for a in annos] if annos and all("segmentation" in a for a in annos) else None
    return draw_boxes(image_rgb, boxes, classes, names, None, scale=scale, masks=masks)


def label_image(image_rgb: np.ndarray, text: str, bar_height: Optional[int] = None) -> np.ndarray:
    """The image with a white title bar above it holding `text`."""
    h, w = image_rgb.shape[:2]
    bar_height = bar_height or max(18, min(32, w // 12))
    font_scale = bar_height / 40.0
    bar = np.full((bar_height, w, 3), 255, np.uint8)
    # shrink the text until it fits the width
    while font_scale > 0.25 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)[0][0] > w - 6:
        font_scale *= 0.9
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    cv2.putText(bar, text, (max(3, (w - tw) // 2), (bar_height + th) // 2), cv2.FONT_HERSHEY_SIMPLEX,
                font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, image_rgb], axis=0)


def side_by_side(images: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None, gap: int = 6) -> np.ndarray:
    """RGB images next to each other (top-aligned, white gap and padding), each under its title if given."""
    if titles is not None:
        bar = max(18, min(32, min(im.shape[1] for im in images) // 12))
        images = [label_image(im, t, bar) for im, t in zip(images, titles)]
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for im in images:
        canvas[: im.shape[0], x: x + im.shape[1]] = im
        x += im.shape[1] + gap
    return canvas


class ModelRunner(DefaultPredictor):
    """detectron2's DefaultPredictor (an HxWx3 BGR image in, the model's outputs for it out: a dict with
    "instances" in the image's own pixels), its weights loaded by AACheckpointer (restricted .pkl
    unpickling, pretrained 3x3 kernels into AA convolutions), with `class_names` of the config's datasets.

    `weights` defaults to cfg.MODEL.WEIGHTS; empty means random initial weights.
    """

    def __init__(self, cfg, weights=None):
        weights = cfg.MODEL.WEIGHTS if weights is None else weights
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""  # DefaultPredictor's DetectionCheckpointer loads nothing; AACheckpointer does
        super().__init__(cfg)
        AACheckpointer.from_config(self.model, cfg).load(weights)
        self.weights = weights
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        meta = MetadataCatalog.get(names[0]) if names else None
        self.class_names = class_names(meta, cfg.MODEL.RETINANET.NUM_CLASSES)
