"""Pictures of detections, results files, attention maps and comparisons (tiny random-weight models)."""
import datetime
import json
import logging
import os
import pickle
import re

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402

from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.errors import InputError, UsageError  # noqa: E402
from aa_detection.safe_io import UnsafePickleError  # noqa: E402
from aa_detection.visualization import (  # noqa: E402
    ModelRunner, compute_attention, draw_predictions, find_aa_layer, query_cell, read_image,
)
from aa_detection.visualization.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # trained models and whole-tool runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AA_CFG = os.path.join(ROOT, "configs/synthetic/retinanet_AA_R_18_FPN_synthetic.yaml")
BASE_CFG = os.path.join(ROOT, "configs/synthetic/retinanet_R_18_FPN_synthetic.yaml")
GAP = 6  # side_by_side's default gap


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4+3 image synthetic dataset, the options that point configs at it, and saved random weights."""
    from aa_detection.data import ensure_synthetic_dataset

    _forget_synthetic()  # other test modules may have registered the names on other folders
    tmp = tmp_path_factory.mktemp("vis")
    root = ensure_synthetic_dataset(str(tmp / "synthetic"), num_train=4, num_val=3, image_size=(64, 96))
    opts = ["DATASETS.SYNTHETIC.ROOT", root, "DATASETS.SYNTHETIC.NUM_TRAIN", "4", "DATASETS.SYNTHETIC.NUM_VAL", "3",
            "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "INPUT.MAX_SIZE_TRAIN", "128",
            "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50",
            "MODEL.RETINANET.PRIOR_PROB", "0.3"]  # random models score about 0.3: boxes to draw
    weights = {}
    for name, cfg_file in (("aa", AA_CFG), ("base", BASE_CFG)):
        torch.manual_seed(0)
        runner = ModelRunner(setup_cfg(cfg_file, opts), weights="")
        weights[name] = str(tmp / f"{name}.pth")
        torch.save({"model": runner.model.state_dict()}, weights[name])
    images = tmp / "images"
    images.mkdir()
    val = DatasetCatalog.get("synthetic_val")
    for r in val[:2]:
        cv2.imwrite(str(images / os.path.basename(r["file_name"]).replace(".jpg", ".png")), cv2.imread(r["file_name"]))
    yield {"tmp": tmp, "opts": opts, "weights": weights, "images": images, "val": val}
    _forget_synthetic()


def _forget_synthetic():
    for name in ("synthetic_train", "synthetic_val"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def aa_runner(setup):
    return ModelRunner(setup_cfg(AA_CFG, setup["opts"]), setup["weights"]["aa"])


def _read(path):
    image = cv2.imread(str(path))
    assert image is not None, f"{path} does not decode as an image"
    return image


def test_predict_files_and_threshold(setup, tmp_path):
    inputs = sorted(setup["images"].iterdir())
    common = ["--config-file", AA_CFG, "--weights", setup["weights"]["aa"], "--format", "png", "--quiet",
              "--input", str(setup["images"])]
    assert main(["predict", *common, "--threshold", "0", "--output", str(tmp_path / "all"), *setup["opts"]]) == 0
    assert main(["predict", *common, "--threshold", "1.01", "--output", str(tmp_path / "none"), *setup["opts"]]) == 0
    for src in inputs:
        original = _read(src).astype(np.int16)
        drawn = _read(tmp_path / "all" / src.name).astype(np.int16)
        empty = _read(tmp_path / "none" / src.name).astype(np.int16)
        assert drawn.shape == empty.shape == original.shape
        assert np.abs(drawn - original).mean() > 2  # boxes and labels drawn
        assert np.abs(empty - original).max() <= 2  # a threshold above every score draws nothing


def test_draw_predictions_marks_box_only_when_scored(setup):
    image = np.full((80, 120, 3), 127, np.uint8)
    inst = Instances((80, 120), pred_boxes=Boxes(torch.tensor([[20.0, 10.0, 90.0, 60.0]])),
                     scores=torch.tensor([0.7]), pred_classes=torch.tensor([1]))
    drawn = draw_predictions(image, inst, ["a", "b"], threshold=0.5, scale=2.0)
    assert drawn.shape == (160, 240, 3)
    assert (drawn[20:121, 40] != 127).any()  # the box's left edge (scaled by 2)
    assert (drawn[150:, :] == 127).all()  # far from the box: untouched
    assert (draw_predictions(image, inst, ["a", "b"], threshold=0.8) == image).all()


def test_masks_are_drawn_for_predictions_and_ground_truth():
    """A predicted mask (a disc in the box) and the same mask as a ground-truth RLE colour the disc's
    pixels; inside the box but outside the disc, away from the outline, the image stays as it was."""
    from pycocotools import mask as mask_util

    from aa_detection.visualization import draw_ground_truth

    image = np.full((80, 120, 3), 127, np.uint8)
    disc = np.zeros((80, 120), np.uint8)
    cv2.circle(disc, (55, 35), 15, 1, -1)
    inst = Instances((80, 120), pred_boxes=Boxes(torch.tensor([[20.0, 10.0, 90.0, 60.0]])),
                     scores=torch.tensor([0.9]), pred_classes=torch.tensor([0]),
                     pred_masks=torch.from_numpy(disc).bool()[None])
    rle = mask_util.encode(np.asfortranarray(disc))
    record = {"annotations": [{"bbox": [20, 10, 70, 50], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                               "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}]}
    for drawn in (draw_predictions(image, inst, ["a"], threshold=0.5), draw_ground_truth(image, record, ["a"])):
        assert (np.abs(drawn[35, 55].astype(int) - 127) > 10).any()  # the disc's centre is coloured
        assert (drawn[52:56, 80:86] == 127).all()  # in the box, outside the disc and the outline
    no_mask = Instances((80, 120), pred_boxes=inst.pred_boxes, scores=inst.scores, pred_classes=inst.pred_classes)
    assert (draw_predictions(image, no_mask, ["a"], threshold=0.5)[35, 55] == 127).all()


def test_predict_dataset_shows_ground_truth_beside(setup, tmp_path):
    assert main(["predict", "--config-file", BASE_CFG, "--weights", setup["weights"]["base"], "--quiet",
                 "--dataset", "synthetic_val", "--max-images", "2", "--threshold", "0.2",
                 "--output", str(tmp_path), *setup["opts"]]) == 0
    for r in setup["val"][:2]:
        out = _read(tmp_path / (os.path.splitext(os.path.basename(r["file_name"]))[0] + ".jpg"))
        assert out.shape[1] == 2 * r["width"] + GAP and out.shape[0] > r["height"]


def test_dataset_registered_from_its_files_as_train_net_does(setup, tmp_path, capsys):
    """--dataset NAME JSON IMAGE_ROOT registers a COCO-format dataset, as tools/train_net.py's --dataset,
    and draws it; two values are refused with a usage error."""
    root = setup["val"][0]["file_name"].rsplit("/", 2)[0]
    args = ["predict", "--config-file", BASE_CFG, "--weights", setup["weights"]["base"], "--quiet",
            "--max-images", "1", "--threshold", "0.2", "--output", str(tmp_path)]
    assert main([*args, "--dataset", "mine_val", f"{root}/val.json", f"{root}/val", *setup["opts"]]) == 0
    first = setup["val"][0]
    out = _read(tmp_path / (os.path.splitext(os.path.basename(first["file_name"]))[0] + ".jpg"))
    assert out.shape[1] == 2 * first["width"] + GAP  # the ground truth from val.json beside the detections
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--dataset", "mine_val", f"{root}/val.json", *setup["opts"]])
    assert exit_info.value.code == 2 and "--dataset takes NAME" in capsys.readouterr().err


def test_results_json_without_model(setup, tmp_path):
    val = setup["val"]
    with open(val[0]["file_name"].rsplit("/", 2)[0] + "/val.json") as f:
        cats = {c["name"]: c["id"] for c in json.load(f)["categories"]}
    dataset_ids = list(cats.values())
    results = [{"image_id": r["image_id"], "category_id": dataset_ids[a["category_id"]], "bbox": a["bbox"],
                "score": 0.9} for r in val for a in r["annotations"]]
    path = tmp_path / "coco_instances_results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "out"
    args = ["results", "--results", str(path), "--dataset", "synthetic_val", "--config-file", AA_CFG, "--quiet",
            "--format", "png"]
    assert main([*args, "--output", str(out), *setup["opts"]]) == 0
    assert main([*args, "--output", str(out / "none"), "--threshold", "0.95", *setup["opts"]]) == 0
    for r in val:
        name = os.path.splitext(os.path.basename(r["file_name"]))[0] + ".png"
        both, none = _read(out / name), _read(out / "none" / name)
        w = r["width"]
        assert both.shape[1] == 2 * w + GAP
        # results identical to the ground truth: both panels show the same boxes
        gt, pred = both[:, :w].astype(np.int16), both[:, w + GAP:].astype(np.int16)
        empty = none[:, w + GAP:].astype(np.int16)
        assert np.abs(pred - empty).mean() > 2
        assert np.abs(gt - none[:, :w].astype(np.int16)).max() <= 2


def test_missing_and_corrupt_inputs_are_named_and_others_exported(setup, tmp_path, listen_to):
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(setup["images"].iterdir())[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = str(tmp_path / "missing.png")
    caplog = listen_to("aa_detection.visualize")
    with caplog.at_level(logging.ERROR, logger="aa_detection.visualize"):
        status = main(["predict", "--config-file", AA_CFG, "--weights", setup["weights"]["aa"], "--quiet",
                       "--input", str(folder), missing, "--output", str(tmp_path / "out"), *setup["opts"]])
    assert status == 1
    assert "corrupt.jpg" in caplog.text and "missing.png" in caplog.text and "2 input(s)" in caplog.text
    assert sorted(os.listdir(tmp_path / "out")) == [good.stem + ".jpg"]


def test_inputs_follow_the_demo_rule_patterns_and_folders_without_images_are_errors(setup, tmp_path):
    """--input takes glob patterns, as tools/demo.py does; a pattern or a folder that yields no image stops
    the command with an InputError naming it."""
    def predict(item):
        return main(["predict", "--config-file", AA_CFG, "--weights", setup["weights"]["aa"], "--quiet",
                     "--input", item, "--output", str(tmp_path / "out"), *setup["opts"]])

    first = sorted(setup["images"].iterdir())[0]
    assert predict(str(setup["images"] / (first.stem + ".*"))) == 0
    assert os.listdir(tmp_path / "out") == [first.stem + ".jpg"]
    bracketed = tmp_path / "in" / "shot[1].png"  # an existing file is a file, whatever its name holds
    bracketed.parent.mkdir()
    bracketed.write_bytes(first.read_bytes())
    assert predict(str(bracketed)) == 0 and (tmp_path / "out" / "shot[1].jpg").is_file()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    for item in (str(tmp_path / "empty"), str(tmp_path / "nothing*.png"), str(tmp_path / "empty" / "*")):
        with pytest.raises(InputError, match=f"--input {re.escape(item)}: no images found"):
            predict(item)


def test_runner_loads_weights_through_the_safe_checkpointer(setup, tmp_path):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "extra": datetime.date(2019, 4, 22)}))
    with pytest.raises(UnsafePickleError, match="weights.pkl"):
        ModelRunner(setup_cfg(BASE_CFG, setup["opts"]), str(path))
    runner = ModelRunner(setup_cfg(BASE_CFG, setup["opts"]), setup["weights"]["base"])
    saved = torch.load(setup["weights"]["base"], weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in runner.model.state_dict().items())
    assert not runner.model.training


def test_query_cell_mapping():
    # 100x200 image resized x2 to 200x400, stride 32: x=100 -> 200 in the input -> column 6
    assert query_cell(100, 40, (100, 200), (200, 400), (32, 32), (7, 13)) == (2, 6)
    assert query_cell(-5, 1e6, (100, 200), (200, 400), (32, 32), (7, 13)) == (6, 0)  # clamped


def test_attention_maps_are_the_layer_softmax(setup, aa_runner, tmp_path):
    image = read_image(str(sorted(setup["images"].iterdir())[0]), "BGR")
    name, module = find_aa_layer(aa_runner.model)
    assert name.startswith("backbone.bottom_up.res5.") and name.endswith("conv2")
    with pytest.raises(UsageError, match="backbone.bottom_up.res3.0.conv"):
        find_aa_layer(aa_runner.model, "backbone.bottom_up.res5.9.conv2")

    # the weights the layer records in a forward of the model on the same image
    res = compute_attention(aa_runner, image, queries=[(5, 5), (90, 60)], layer=name)
    with module.recording_attention() as kept:
        aa_runner(image)
    full = kept[0][0]
    (r0, c0), (r1, c1) = res.cells
    assert (r0, c0) != (r1, c1)
    assert torch.equal(torch.from_numpy(res.maps[0]), full[:, r0, c0].float())
    assert torch.equal(torch.from_numpy(res.maps[1]), full[:, r1, c1].float())
    assert module._attention_maps is None  # recording ended with compute_attention

    # a stride-2 layer of another stage: grid = its output size
    res3 = compute_attention(aa_runner, image, queries=[(30, 30)], layer="backbone.bottom_up.res3.0.conv1")
    # res3 attends over its output pooled 2x2 once more (MODEL.AA.DOWNSAMPLE_STAGES): stride 8 * 2
    assert res3.stride == (16.0, 16.0) and res3.maps.shape[1:] == (8, *res3.grid)


def test_attention_command_exports_grid_and_maps(setup, tmp_path):
    src = sorted(setup["images"].iterdir())[0]
    h, w = _read(src).shape[:2]
    out = tmp_path / "att"
    assert main(["attention", "--config-file", AA_CFG, "--weights", setup["weights"]["aa"], "--quiet",
                 "--input", str(src), "--query", "10", "10", "--query", "80", "55", "--tile-size", "96",
                 "--output", str(out), *setup["opts"]]) == 0
    grid = _read(out / f"{src.stem}_attention.jpg")
    maps = np.load(out / f"{src.stem}_attention.npy")
    meta = json.loads((out / f"{src.stem}_attention.json").read_text())
    q, heads, gh, gw = maps.shape
    assert q == 2 and heads == 8 and [gh, gw] == meta["grid_hw"]
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5)  # softmax rows, before colouring
    assert not np.allclose(maps[0], maps[1])  # another query, another map
    tile_w = round(w * 96 / max(h, w))
    assert grid.shape[1] == (heads + 1) * tile_w + heads * 3  # image column + one column per head
    assert grid.shape[0] > 2 * round(h * 96 / max(h, w))

    # automatic queries: the top-k detections
    assert main(["attention", "--config-file", AA_CFG, "--weights", setup["weights"]["aa"], "--quiet",
                 "--input", str(src), "--top-k", "3", "--threshold", "0", "--output", str(tmp_path / "auto"),
                 *setup["opts"]]) == 0
    auto = np.load(tmp_path / "auto" / f"{src.stem}_attention.npy")
    cells = json.loads((tmp_path / "auto" / f"{src.stem}_attention.json").read_text())["cells_row_col"]
    assert 1 <= auto.shape[0] <= 3 and len({tuple(c) for c in cells}) == len(cells)  # one query per cell
    np.testing.assert_allclose(auto.sum(axis=(2, 3)), 1.0, atol=1e-5)


def test_attention_bad_layer_lists_names(setup, tmp_path):
    with pytest.raises(UsageError, match="available: backbone.bottom_up"):
        main(["attention", "--config-file", AA_CFG, "--weights", setup["weights"]["aa"], "--quiet",
              "--input", str(setup["images"]), "--layer", "nope", "--output", str(tmp_path), *setup["opts"]])


def test_compare_side_by_side(setup, tmp_path):
    args = ["compare", "--config-file", BASE_CFG, AA_CFG, "--weights", setup["weights"]["base"],
            setup["weights"]["aa"], "--threshold", "0.2", "--quiet"]
    assert main([*args, "--input", str(setup["images"]), "--output", str(tmp_path / "a"), *setup["opts"]]) == 0
    for src in sorted(setup["images"].iterdir()):
        h, w = _read(src).shape[:2]
        out = _read(tmp_path / "a" / f"{src.stem}_compare.jpg")
        assert out.shape[1] == 2 * w + GAP and out.shape[0] > h
    assert main([*args, "--dataset", "synthetic_val", "--max-images", "1", "--output", str(tmp_path / "b"),
                 *setup["opts"]]) == 0
    r = setup["val"][0]
    out = _read(tmp_path / "b" / (os.path.splitext(os.path.basename(r["file_name"]))[0] + "_compare.jpg"))
    assert out.shape[1] == 3 * r["width"] + 2 * GAP


def test_matched_ground_truth_counts_class_and_iou():
    from detectron2.structures import BoxMode

    from aa_detection.visualization.cli import matched_ground_truth

    record = {"annotations": [{"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
                              {"bbox": [20, 20, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1}]}
    inst = Instances((40, 40), pred_boxes=Boxes(torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])),
                     scores=torch.tensor([0.9, 0.8, 0.7]), pred_classes=torch.tensor([0, 0, 0]))
    assert matched_ground_truth(inst, record, 0.5) == 1  # the third has the wrong class, the second a duplicate
    assert matched_ground_truth(inst, record, 0.95) == 0
