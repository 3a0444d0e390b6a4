"""`tools/visualize.py`: detections, attention maps and baseline-vs-AA comparisons as images.

    predict    config + weights + inputs -> one picture of the detections per image
               (for --dataset, the ground truth beside it)
    results    a coco_instances_results.json + its dataset -> the same pictures, without a model
    attention  config + weights + images -> a grid of each head's attention maps, one row per query
    compare    two configs + two weights -> their detections side by side (and the ground truth)

Inputs are image files, folders (their images, sorted), glob patterns or a dataset (with --max-images):
`--dataset NAME` a registered one (a detectron2 builtin, the config's, synthetic_val), `--dataset NAME JSON
IMAGE_ROOT` a COCO-format one registered under NAME first, as tools/train_net.py's --dataset; a folder or
pattern without images is an InputError. An image that is missing
or cannot be decoded is reported by name and skipped; the others are still exported, and the command then
exits with status 1 and the count of failures.
Each output is written atomically to --output, named after its input (name clashes get a suffix).
A bad config, dataset, weights file, results file or argument raises a `UserError`
(`aa_detection.errors`): `tools/visualize.py` prints its message and exits with status 2.
"""
import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import InputError, UsageError, exit_on_user_error
from ..safe_io import atomic_write
from .predictions import (
    ModelRunner, class_names, draw_ground_truth, draw_predictions, expand_inputs, read_image, side_by_side,
    to_rgb, write_image,
)

if TYPE_CHECKING:
    from detectron2.structures import Instances

__all__ = ["argument_parser", "parse_args", "main", "matched_ground_truth"]

logger = logging.getLogger("aa_detection.visualize")


# ----------------------------------------------------------------------------------------------- inputs
class Item:
    """One image to export: its path, an output stem, and its dataset dict when it comes from a dataset."""

    def __init__(self, path, stem, record=None):
        self.path, self.stem, self.record = path, stem, record


def _input_items(inputs):
    """Items of --input: files as given (a missing one is reported when read), folders and patterns."""
    return [Item(p, os.path.splitext(os.path.basename(p))[0]) for p in expand_inputs(inputs)]


def _dataset_items(name, max_images):
    from detectron2.data import DatasetCatalog

    if name not in DatasetCatalog.list():
        raise UsageError(f"dataset '{name}' is not registered; name it in the config's DATASETS, give "
                         f"--dataset {name} JSON IMAGE_ROOT, or use a detectron2 builtin dataset")
    records = DatasetCatalog.get(name)
    if max_images:
        records = records[:max_images]
    return [Item(r["file_name"], os.path.splitext(os.path.basename(r["file_name"]))[0], r) for r in records]


def _unique_names(items, ext, suffix=""):
    seen, names = {}, []
    for item in items:
        stem = item.stem + suffix
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(f"{stem}{'' if n == 0 else f'_{n}'}.{ext}")
    return names


def _setup(config_file, args, extra_opts=()):
    from ..config import setup_cfg

    opts = list(args.opts or []) + list(extra_opts)
    files = args.dataset_files
    if args.dataset and not files:
        # lets setup_cfg register the dataset (e.g. synthetic_val) when the config does not name it
        from detectron2.data import DatasetCatalog

        if args.dataset not in DatasetCatalog.list():
            opts += ["DATASETS.TEST", f"('{args.dataset}',)"]
    return setup_cfg(config_file, opts, datasets=[(args.dataset, *files)] if files else [],
                     trusted=args.trust_config)


def _items(args):
    items = []
    if args.dataset:
        items += _dataset_items(args.dataset, args.max_images)
    items += _input_items(args.input or [])
    if not items:
        raise UsageError("no input: give image files, folders or patterns (--input) or --dataset NAME")
    return items


def _dataset_names(args, fallback):
    from detectron2.data import MetadataCatalog

    if args.dataset:
        return class_names(MetadataCatalog.get(args.dataset), len(fallback))
    return fallback


def _run(items, out_names, args, export, what):
    """Export each item, reporting failures by name; returns the failure count."""
    os.makedirs(args.output, exist_ok=True)
    failed = []
    for item, out_name in tqdm(list(zip(items, out_names)), desc=what, unit="image", disable=args.quiet):
        try:
            export(item, os.path.join(args.output, out_name))
        except InputError as e:
            logger.error("skipped: %s", e)
            failed.append(item.path)
    done = len(items) - len(failed)
    logger.info("%s: %d of %d images exported to %s", what, done, len(items), args.output)
    if failed:
        logger.error("%d input(s) could not be read: %s", len(failed), ", ".join(failed))
    return len(failed)


# --------------------------------------------------------------------------------------------- commands
def cmd_predict(args: argparse.Namespace) -> int:
    cfg = _setup(args.config_file, args)
    items = _items(args)  # bad inputs fail before the model is built
    runner = ModelRunner(cfg, args.weights)
    names = _dataset_names(args, runner.class_names)

    def export(item: Item, path: str) -> None:
        image = read_image(item.path, "BGR")
        rgb = to_rgb(image, "BGR")
        pred = draw_predictions(rgb, runner(image)["instances"], names, args.threshold, args.scale)
        if item.record is not None and not args.no_gt:
            gt = draw_ground_truth(rgb, item.record, names, args.scale)
            pred = side_by_side([gt, pred], ["ground truth", f"prediction (score >= {args.threshold:g})"])
        write_image(path, pred, args.quality)

    return _run(items, _unique_names(items, args.format), args, export, "predict")


def _results_by_image(results_file):
    if not os.path.isfile(results_file):
        raise InputError(f"results file not found: {results_file}")
    try:
        with open(results_file) as f:
            results = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{results_file}: not a JSON file ({e})") from e
    if not isinstance(results, list):
        raise InputError(f"{results_file}: expected COCO detection results (a list of "
                         f"{{image_id, category_id, bbox, score}}), got {type(results).__name__}")
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return by_image


def _results_instances(dets, metadata):
    """COCO results of one image -> (boxes XYXY, scores, contiguous classes)."""
    to_contiguous = metadata.get("thing_dataset_id_to_contiguous_id", None)
    boxes, scores, classes = [], [], []
    for d in dets:
        x, y, w, h = d["bbox"]
        boxes.append([x, y, x + w, y + h])
        scores.append(d["score"])
        c = d["category_id"]
        classes.append(to_contiguous[c] if to_contiguous else c)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return (np.asarray(boxes, np.float64).reshape(-1, 4)[order], np.asarray(scores)[order],
            np.asarray(classes, np.int64)[order])


def cmd_results(args: argparse.Namespace) -> int:
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances
    import torch

    if not args.dataset:
        raise UsageError("results: --dataset NAME is required (the dataset the results were computed on)")
    _setup(args.config_file, args)
    by_image = _results_by_image(args.results)
    items = _dataset_items(args.dataset, 0)  # loading it sets the category id mapping
    metadata = MetadataCatalog.get(args.dataset)
    names = class_names(metadata)
    unknown = set(by_image) - {item.record["image_id"] for item in items}
    items = items[: args.max_images] if args.max_images else items
    if unknown:
        logger.warning("%d image ids of %s are not in dataset %s", len(unknown), args.results, args.dataset)

    def export(item: Item, path: str) -> None:
        rgb = read_image(item.path, "RGB")
        h, w = rgb.shape[:2]
        boxes, scores, classes = _results_instances(by_image.get(item.record["image_id"], []), metadata)
        inst = Instances((h, w), pred_boxes=Boxes(torch.as_tensor(boxes, dtype=torch.float32)),
                         scores=torch.as_tensor(scores, dtype=torch.float32),
                         pred_classes=torch.as_tensor(classes, dtype=torch.int64))
        pred = draw_predictions(rgb, inst, names, args.threshold, args.scale)
        if not args.no_gt:
            gt = draw_ground_truth(rgb, item.record, names, args.scale)
            pred = side_by_side([gt, pred], ["ground truth", f"results (score >= {args.threshold:g})"])
        write_image(path, pred, args.quality)

    return _run(items, _unique_names(items, args.format), args, export, "results")


def cmd_attention(args: argparse.Namespace) -> int:
    from .attention import attention_grid, compute_attention, find_aa_layer

    cfg = _setup(args.config_file, args)
    items = _items(args)  # bad inputs fail before the model is built
    runner = ModelRunner(cfg, args.weights)
    layer, _ = find_aa_layer(runner.model, args.layer)  # a bad name fails before any image is read
    logger.info("attention of %s", layer)

    def export(item: Item, path: str) -> None:
        image = read_image(item.path, "BGR")
        result = compute_attention(runner, image, args.query, layer, args.top_k, args.threshold)
        grid = attention_grid(to_rgb(image, "BGR"), result, args.tile_size, args.cmap, args.alpha)
        stem = os.path.splitext(path)[0]
        if args.save_maps:
            with atomic_write(stem + ".npy") as f:
                np.save(f, result.maps)
            with atomic_write(stem + ".json", "w") as f:
                json.dump(result.metadata(), f)
        write_image(path, grid, args.quality)

    return _run(items, _unique_names(items, args.format, "_attention"), args, export, "attention")


def matched_ground_truth(instances: "Instances", record: dict, threshold: float, iou: float = 0.5) -> int:
    """How many ground-truth objects of `record` a detection scoring >= threshold finds: same class,
    IoU >= `iou`, each detection matched at most once (greedily, highest score first)."""
    from detectron2.structures import Boxes, BoxMode, pairwise_iou
    import torch

    from .predictions import instances_to_arrays

    annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    boxes, _, classes = instances_to_arrays(instances, threshold)
    if not annos or not len(boxes):
        return 0
    gt = Boxes(torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                            dtype=torch.float32))
    ious = pairwise_iou(Boxes(torch.as_tensor(boxes, dtype=torch.float32)), gt).numpy()
    gt_classes = np.array([a["category_id"] for a in annos])
    taken = np.zeros(len(annos), bool)
    for d in range(len(boxes)):
        ok = (ious[d] >= iou) & (gt_classes == classes[d]) & ~taken
        if ok.any():
            taken[np.argmax(np.where(ok, ious[d], -1))] = True
    return int(taken.sum())


def _boxes(n):
    return f"{n} box" if n == 1 else f"{n} boxes"


def cmd_compare(args: argparse.Namespace) -> int:
    if len(args.config_file) != 2 or len(args.weights) != 2:
        raise UsageError("compare: give two --config-file and two --weights (baseline first, then AA)")
    titles = args.names or [os.path.splitext(os.path.basename(c))[0] for c in args.config_file]
    cfgs = [_setup(config_file, args) for config_file in args.config_file]
    items = _items(args)  # bad inputs fail before the models are built
    runners = [ModelRunner(cfg, weights) for cfg, weights in zip(cfgs, args.weights)]
    if runners[0].class_names != runners[1].class_names:
        logger.warning("the two models name their classes differently: %s vs %s",
                       runners[0].class_names, runners[1].class_names)
    names = _dataset_names(args, runners[0].class_names)

    def export(item: Item, path: str) -> None:
        panels, captions = [], []
        image = read_image(item.path, "BGR")
        rgb = to_rgb(image, "BGR")
        for runner, title in zip(runners, titles):
            inst = runner(image)["instances"]
            n = int((inst.scores >= args.threshold).sum())
            panels.append(draw_predictions(rgb, inst, names, args.threshold, args.scale))
            if item.record is not None:
                found = matched_ground_truth(inst, item.record, args.threshold)
                captions.append(f"{title}: {_boxes(n)}, {found}/{len(item.record.get('annotations', []))} found")
            else:
                captions.append(f"{title}: {_boxes(n)}")
        if item.record is not None and not args.no_gt:
            panels.insert(0, draw_ground_truth(rgb, item.record, names, args.scale))
            captions.insert(0, f"ground truth: {_boxes(len(item.record.get('annotations', [])))}")
        write_image(path, side_by_side(panels, captions), args.quality)

    return _run(items, _unique_names(items, args.format, "_compare"), args, export, "compare")


# ----------------------------------------------------------------------------------------------- parser
def argument_parser() -> argparse.ArgumentParser:
    from ..config import add_overrides_argument, add_trust_config_argument

    parser = argparse.ArgumentParser(prog="tools/visualize.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, model: bool = True, inputs: bool = True) -> None:
        add_trust_config_argument(p)
        if inputs:
            p.add_argument("--input", nargs="+", metavar="PATH", help="image files, folders of images or glob patterns")
        p.add_argument("--dataset", nargs="+", metavar="NAME [JSON IMAGE_ROOT]",
                       help="a registered dataset (e.g. synthetic_val), or a COCO-format one to register as NAME")
        p.add_argument("--max-images", type=int, default=0, help="first N images of --dataset (0: all)")
        p.add_argument("--threshold", type=float, default=0.5, help="smallest score drawn")
        p.add_argument("--output", required=True, help="output folder")
        p.add_argument("--format", choices=("jpg", "png"), default="jpg")
        p.add_argument("--scale", type=float, default=1.0, help="drawing scale of the image")
        p.add_argument("--quality", type=int, default=92, help="JPEG quality (1-100)")
        p.add_argument("--no-gt", action="store_true", help="do not draw the ground truth of --dataset")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        add_overrides_argument(p)

    p = sub.add_parser("predict", help="draw a model's detections")
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", default=None, help="checkpoint (default: MODEL.WEIGHTS of the config)")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("results", help="draw a coco_instances_results.json without running a model")
    p.add_argument("--results", required=True, help="coco_instances_results.json (COCOEvaluator's output)")
    p.add_argument("--config-file", default=None, help="config that registers the dataset (optional)")
    common(p, inputs=False)
    p.set_defaults(func=cmd_results, input=None)

    p = sub.add_parser("attention", help="attention maps of an AA layer, one row per query, one column per head")
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--layer", default=None, help="AAConv2d module name (default: the deepest one)")
    p.add_argument("--query", nargs=2, type=float, action="append", metavar=("X", "Y"),
                   help="query pixel in image coordinates (repeatable); default: centres of top detections")
    p.add_argument("--top-k", type=int, default=3, help="automatic queries: the top-k detections")
    p.add_argument("--tile-size", type=int, default=192, help="longer side of each tile in pixels")
    p.add_argument("--cmap", default="jet", help="matplotlib colormap")
    p.add_argument("--alpha", type=float, default=0.6, help="opacity of the coloured map")
    p.add_argument("--no-save-maps", dest="save_maps", action="store_false",
                   help="do not write the raw maps (.npy, (queries, heads, H', W')) and their .json")
    common(p)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("compare", help="baseline and AA detections side by side")
    p.add_argument("--config-file", nargs=2, required=True, metavar=("BASELINE", "AA"))
    p.add_argument("--weights", nargs=2, required=True, metavar=("BASELINE", "AA"))
    p.add_argument("--names", nargs=2, metavar=("BASELINE", "AA"), help="panel titles")
    common(p)
    p.set_defaults(func=cmd_compare)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line's arguments, the config overrides after --input or --dataset among them.
    `dataset` is the dataset's NAME, `dataset_files` its (JSON, IMAGE_ROOT) to register, or ()."""
    from ..config import split_overrides

    parser = argument_parser()
    args = parser.parse_args(argv)
    args.input, args.opts = split_overrides(args.input or [], args.opts)
    dataset, args.opts = split_overrides(args.dataset or [], args.opts)
    if len(dataset) not in (0, 1, 3):
        parser.error(f"--dataset takes NAME (a registered dataset) or NAME JSON IMAGE_ROOT, got {dataset}")
    args.dataset, args.dataset_files = (dataset[0] if dataset else None), tuple(dataset[1:])
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 1 when some input could not be read).
    Raises a `UserError` for a bad config, dataset, weights file, results file or argument."""
    args = parse_args(argv)
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    failures = args.func(args)
    if failures:
        logger.error("%d input(s) failed", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
