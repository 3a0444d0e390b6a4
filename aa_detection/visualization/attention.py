"""Attention maps of an attention-augmented convolution, as in the paper's figures.

The maps are the layer's own softmax weights from the model's real forward on the image: the chosen
AAConv2d records them (`AAConv2d.recording_attention`: the naive path, its softmax weights kept) while
the model runs once (that forward also gives the detections used to pick queries automatically), as
(B, Nh, H', W', H', W'). Nothing is recomputed, so what is shown is what produced the layer's output.

Coordinates. A query is given in the pixels of the original image, (x, y). The model sees the image
resized by the config's test transform (factor rw / w across, rh / h down) and padded at the bottom and
right to the backbone's size divisibility, Hp x Wp. The layer's attention grid is H' x W' and its stride
on the network input is s = (Hp / H', Wp / W') (8, 16 or 32 for res3, res4, res5: a strided AAConv2d
attends at its output size, the input pooled 2x2; 16 for res3 when its attention is pooled once more,
MODEL.AA.DOWNSAMPLE_STAGES). Grid cell (row, col) covers the resized-input pixels
[col * sx, (col + 1) * sx) x [row * sy, (row + 1) * sy), so a query maps to

    col = floor(x * rw / w / sx),   row = floor(y * rh / h / sy)   (clamped to the grid).

For display, each head's map over the keys (H' x W') is resized bilinearly to the padded input
(cell centres at ((col + 0.5) sx, (row + 0.5) sy)), cropped to the resized image (dropping the
padding) and resized to the original image. The keys in the padding are real keys of the layer: they
hold part of the mass of the full map (which sums to one) but lie outside the picture.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from matplotlib import colormaps

from ..errors import UsageError
from ..layers import AAConv2d
from .predictions import ModelRunner, instances_to_arrays, label_image, side_by_side

__all__ = [
    "AttentionResult", "aa_layer_names", "find_aa_layer", "query_cell", "cell_box", "compute_attention",
    "attention_to_image", "colorize", "attention_grid",
]


@dataclasses.dataclass
class AttentionResult:
    layer: str
    maps: np.ndarray  # (Q, Nh, H', W') float32: softmax weights of each query over all keys
    queries: list  # [(x, y)] in original-image pixels
    cells: list  # [(row, col)] on the layer's grid
    labels: list  # one caption per query
    image_size: tuple  # (h, w) of the original image
    resized_size: tuple  # (rh, rw) after the test resize
    padded_size: tuple  # (Hp, Wp) of the network input
    grid: tuple  # (H', W')
    stride: tuple  # (sy, sx)
    instances: object = None  # the detections of the same forward (detectron2 Instances)

    def metadata(self) -> Dict[str, Any]:
        """JSON-serialisable description of the maps (saved beside the .npy)."""
        return {
            "layer": self.layer, "shape": list(self.maps.shape), "queries_xy": [list(map(float, q)) for q in self.queries],
            "cells_row_col": [list(map(int, c)) for c in self.cells], "labels": list(self.labels),
            "image_hw": list(self.image_size), "resized_hw": list(self.resized_size),
            "padded_hw": list(self.padded_size), "grid_hw": list(self.grid), "stride_yx": list(self.stride),
        }


def aa_layer_names(model: torch.nn.Module) -> List[str]:
    """Names of the model's AAConv2d modules, in module order (shallowest first)."""
    return [name for name, m in model.named_modules() if isinstance(m, AAConv2d)]


def find_aa_layer(model: torch.nn.Module, name: Optional[str] = None) -> Tuple[str, AAConv2d]:
    """(name, module) of an AAConv2d. Default: the last one of the deepest augmented stage (for an
    AA-ResNet, the last block's 3x3 convolution, e.g. backbone.bottom_up.res5.2.conv2). A name that is
    not an AA convolution is a UsageError listing the available names."""
    names = aa_layer_names(model)
    if not names:
        raise UsageError("the model has no attention-augmented convolution (AAConv2d); use an AA config "
                       "(MODEL.BACKBONE.NAME build_retinanet_aa_resnet_fpn_backbone)")
    if name is None:
        name = names[-1]
    if name not in names:
        raise UsageError(f"'{name}' is not an attention-augmented convolution of the model; available: "
                       + ", ".join(names))
    return name, dict(model.named_modules())[name]


def query_cell(x: float, y: float, image_size: Tuple[int, int], resized_size: Tuple[int, int], stride: Tuple[int, int],
               grid: Tuple[int, int]) -> Tuple[int, int]:
    """(row, col) of the grid cell holding the original-image pixel (x, y); see the module docstring."""
    (h, w), (rh, rw), (sy, sx), (gh, gw) = image_size, resized_size, stride, grid
    col = int(np.floor(x * rw / w / sx))
    row = int(np.floor(y * rh / h / sy))
    return min(max(row, 0), gh - 1), min(max(col, 0), gw - 1)


def cell_box(cell: Tuple[int, int], image_size: Tuple[int, int], resized_size: Tuple[int, int],
             stride: Tuple[int, int]) -> Tuple[float, float, float, float]:
    """The (x0, y0, x1, y1) extent of a grid cell in original-image pixels."""
    (row, col), (h, w), (rh, rw), (sy, sx) = cell, image_size, resized_size, stride
    fx, fy = w / rw, h / rh
    return col * sx * fx, row * sy * fy, (col + 1) * sx * fx, (row + 1) * sy * fy


def _auto_queries(instances, top_k, threshold, names, to_cell):
    """Box centres of the best detections, at most one per grid cell (a cell's queries share one map)."""
    boxes, scores, classes = instances_to_arrays(instances, threshold)
    queries, labels, cells = [], [], set()
    for box, score, c in zip(boxes, scores, classes):
        if len(queries) == top_k:
            break
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        if to_cell(*centre) in cells:
            continue
        cells.add(to_cell(*centre))
        queries.append(centre)
        name = names[int(c)] if names and 0 <= int(c) < len(names) else f"class {int(c)}"
        labels.append(f"{name} {100 * score:.0f}%")
    return queries, labels


def compute_attention(runner: ModelRunner, image: np.ndarray, queries: Optional[Sequence[Tuple[float, float]]] = None,
                      layer: Optional[str] = None, top_k: int = 3, threshold: float = 0.3) -> AttentionResult:
    """Run `runner` (a ModelRunner) once on `image` (HxWx3 BGR, as DefaultPredictor takes it) with the
    chosen AA layer keeping its softmax weights, and return an AttentionResult.

    `queries`: [(x, y)] in original-image pixels; None picks the box centres of the `top_k`
    highest-scoring detections scoring at least `threshold`, skipping a detection whose centre falls in
    the grid cell of a better one (the image centre when there is none).
    """
    model = runner.model
    name, module = find_aa_layer(model, layer)
    captured = {}

    def grab_resized(_mod: torch.nn.Module, args: tuple) -> None:
        captured["resized"] = tuple(args[0][0]["image"].shape[-2:])  # the test transform's output

    def grab_padded(_mod: torch.nn.Module, args: tuple) -> None:
        captured["padded"] = tuple(args[0].shape[-2:])

    hooks = [model.register_forward_pre_hook(grab_resized), model.backbone.register_forward_pre_hook(grab_padded)]
    try:
        with module.recording_attention() as recorded:
            instances = runner(image)["instances"].to("cpu")
    finally:
        for hook in hooks:
            hook.remove()
    if not recorded:
        raise RuntimeError(f"layer {name} did not run in the forward")
    attention = recorded[-1]
    attention = attention[0].float().cpu()  # (Nh, H', W', H', W')
    grid = tuple(attention.shape[1:3])
    padded, resized_size = captured["padded"], captured["resized"]
    stride = (padded[0] / grid[0], padded[1] / grid[1])
    image_size = tuple(image.shape[:2])

    def to_cell(x: float, y: float) -> Tuple[int, int]:
        return query_cell(x, y, image_size, resized_size, stride, grid)

    if queries:
        queries = [(float(x), float(y)) for x, y in queries]
        labels = [f"query ({x:.0f}, {y:.0f})" for x, y in queries]
    else:
        queries, labels = _auto_queries(instances, top_k, threshold, runner.class_names, to_cell)
        if not queries:
            queries = [(image_size[1] / 2, image_size[0] / 2)]
            labels = ["image centre (no detection)"]
    cells = [to_cell(x, y) for x, y in queries]
    maps = torch.stack([attention[:, r, c] for r, c in cells]).numpy().astype(np.float32)
    return AttentionResult(name, maps, queries, cells, labels, image_size, resized_size, padded,
                           grid, stride, instances)


def attention_to_image(amap: np.ndarray, result: AttentionResult) -> np.ndarray:
    """One map over the keys (H', W') -> an (h, w) float map aligned with the original image."""
    (h, w), (rh, rw), (hp, wp) = result.image_size, result.resized_size, result.padded_size
    up = cv2.resize(np.asarray(amap, np.float32), (wp, hp), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(up[:rh, :rw], (w, h), interpolation=cv2.INTER_LINEAR)


def colorize(image_rgb: np.ndarray, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.6) -> np.ndarray:
    """A [0, 1] heat map coloured by a matplotlib colormap and blended over the image."""
    colored = colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255.0
    return (image_rgb.astype(np.float32) * (1 - alpha) + colored * alpha).clip(0, 255).astype(np.uint8)


def _mark(tile, x, y, box, scale):
    """Draw the query pixel (x, y) and its grid cell `box` (image pixels) on a tile scaled by `scale`."""
    p = (int(round(x * scale)), int(round(y * scale)))
    x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
    cv2.rectangle(tile, (x0, y0), (x1, y1), (255, 255, 255), 1)
    r = max(4, tile.shape[1] // 40)
    cv2.drawMarker(tile, p, (0, 0, 0), cv2.MARKER_CROSS, 2 * r + 2, 3)
    cv2.drawMarker(tile, p, (255, 255, 255), cv2.MARKER_CROSS, 2 * r, 1)
    return tile


def attention_grid(image_rgb: np.ndarray, result: AttentionResult, tile_size: int = 192, cmap: str = "jet",
                   alpha: float = 0.6, show_image: bool = True) -> np.ndarray:
    """One row per query, one column per head (after a first column with the image and the query when
    `show_image`), each head's map normalised to its maximum over the picture and coloured over the
    image, the query marked (cross) with its grid cell (white square). Returns an RGB image."""
    h, w = result.image_size
    scale = tile_size / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    base = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    rows = []
    for q, ((x, y), cell, label) in enumerate(zip(result.queries, result.cells, result.labels)):
        box = cell_box(cell, result.image_size, result.resized_size, result.stride)
        tiles, titles = [], []
        if show_image:
            tiles.append(_mark(base.copy(), x, y, box, scale))
            titles.append(label)
        for head, amap in enumerate(result.maps[q]):
            heat = cv2.resize(attention_to_image(amap, result), size, interpolation=cv2.INTER_LINEAR)
            heat = heat / max(float(heat.max()), 1e-12)
            tiles.append(_mark(colorize(base, heat, cmap, alpha), x, y, box, scale))
            titles.append(f"head {head + 1}")
        rows.append(side_by_side(tiles, titles, gap=3))
    width = max(r.shape[1] for r in rows)
    pad = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    grid = np.concatenate(pad, axis=0)
    title = f"{result.layer}: {result.grid[0]}x{result.grid[1]} keys, stride {result.stride[1]:g}"
    return label_image(grid, title, bar_height=24)
