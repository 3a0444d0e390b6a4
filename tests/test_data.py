import json
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
from detectron2.data import DatasetCatalog  # noqa: E402

from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.data import SYNTHETIC_CLASSES, ensure_synthetic_dataset, generate_split  # noqa: E402
from aa_detection.data.synthetic import generate_once  # noqa: E402
from aa_detection.errors import ConfigError, DatasetError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN_CFG = os.path.join(ROOT, "configs/synthetic/retinanet_R_18_FPN_synthetic.yaml")


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_synthetic_is_deterministic_and_varied(tmp_path):
    a = generate_split(str(tmp_path / "a"), "train", 12, seed=3)
    b = generate_split(str(tmp_path / "b"), "train", 12, seed=3)
    assert a == b
    for im in a["images"]:
        assert _read(tmp_path / "a" / "train" / im["file_name"]) == _read(tmp_path / "b" / "train" / im["file_name"])
    c = generate_split(str(tmp_path / "c"), "train", 12, seed=4)
    assert c["annotations"] != a["annotations"]

    big = generate_split(str(tmp_path / "d"), "train", 60, seed=0)
    cats = {x["category_id"] for x in big["annotations"]}
    assert cats == set(range(1, len(SYNTHETIC_CLASSES) + 1))
    sides = [max(x["bbox"][2], x["bbox"][3]) for x in big["annotations"]]
    assert min(sides) <= 12 and max(sides) >= 60
    for x in big["annotations"]:
        im = big["images"][x["image_id"] - 1]
        x0, y0, w, h = x["bbox"]
        assert 0 <= x0 and 0 <= y0 and x0 + w <= im["width"] and y0 + h <= im["height"]
        assert 0 < x["area"] <= w * h


def test_synthetic_masks_are_the_objects_and_reach_the_dataset_dicts(tmp_path):
    """Each annotation's RLE mask has the annotation's area as its pixel count and its box as its extent;
    the checked dataset dicts carry it, from the JSON and from the check's cache; a malformed one is refused."""
    import numpy as np
    from pycocotools import mask as mask_util

    from aa_detection.data.validation import load_checked_coco

    coco = generate_split(str(tmp_path), "val", 6, seed=5)
    sizes = {im["id"]: [im["height"], im["width"]] for im in coco["images"]}
    for ann in coco["annotations"]:
        rle = ann["segmentation"]
        mask = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert rle["size"] == sizes[ann["image_id"]] and mask.sum() == ann["area"]
        ys, xs = np.nonzero(mask)
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == ann["bbox"]
    json_file, image_root, cache = str(tmp_path / "val.json"), str(tmp_path / "val"), tmp_path / "cache"
    for checked in (False, True):  # checked, then read from the cache file the first load wrote
        assert any(cache.glob("val-*.json")) == checked
        records = load_checked_coco("masks", json_file, image_root, cache_dir=str(cache))
        loaded = [a["segmentation"] for r in records for a in r["annotations"]]
        assert loaded == [a["segmentation"] for a in coco["annotations"]]
    # uncompressed RLE (counts a list) is compressed, as detectron2's loader does
    first = coco["annotations"][0]
    rle = first["segmentation"]
    mask = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    first["segmentation"] = {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    uncompressed = tmp_path / "uncompressed.json"
    uncompressed.write_text(json.dumps(coco))
    record = load_checked_coco("rle", str(uncompressed), image_root, cache_dir=str(cache))[first["image_id"] - 1]
    segm = record["annotations"][0]["segmentation"]
    assert (mask_util.decode({"size": segm["size"], "counts": segm["counts"].encode()}) == mask).all()
    bad = tmp_path / "bad.json"
    for wrong in ([[1, 2, 3]], {"size": [5, 5], "counts": "0"}):  # too few coordinates; not the image's size
        first["segmentation"] = wrong
        bad.write_text(json.dumps(coco))
        with pytest.raises(DatasetError, match=f"annotation id {first['id']}: 'segmentation' must be"):
            load_checked_coco("bad", str(bad), image_root, cache_dir=str(cache))


def test_ensure_is_idempotent(tmp_path):
    root = str(tmp_path / "syn")
    ensure_synthetic_dataset(root, num_train=4, num_val=2)
    stamp = os.path.getmtime(os.path.join(root, "train.json"))
    ensure_synthetic_dataset(root, num_train=4, num_val=2)
    assert os.path.getmtime(os.path.join(root, "train.json")) == stamp
    assert sorted(os.listdir(tmp_path)) == ["syn"]  # no temporary folder left behind


def _write(folder, name, text):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def test_a_set_another_process_finished_meanwhile_is_kept_and_a_partial_one_replaced(tmp_path):
    root = tmp_path / "set"

    def finished_by_another_process(folder):
        root.mkdir()
        _write(root, "DONE", json.dumps({"seed": 0, "by": "other"}))
        _write(folder, "data", "ours")
        return {"by": "us"}

    generate_once(str(root), {"seed": 0}, finished_by_another_process)
    assert json.loads((root / "DONE").read_text()) == {"seed": 0, "by": "other"}
    assert sorted(os.listdir(tmp_path)) == ["set"]  # ours removed, no temporary folder left

    partial = tmp_path / "partial"
    partial.mkdir()
    _write(partial, "half", "killed before its DONE stamp")
    generate_once(str(partial), {"seed": 1}, lambda folder: _write(folder, "data", "ours") or {"by": "us"})
    assert sorted(os.listdir(partial)) == ["DONE", "data"]
    assert json.loads((partial / "DONE").read_text()) == {"seed": 1, "by": "us"}
    calls = []
    generate_once(str(partial), {"seed": 1}, calls.append)
    assert calls == []  # finished with these arguments: not generated again
    with pytest.raises(DatasetError, match=r"partial holds a set generated with other arguments: seed 1 \(asked 2\)"):
        generate_once(str(partial), {"seed": 2}, calls.append)


def _coco(path, names, image_root):
    os.makedirs(image_root, exist_ok=True)
    data = {"images": [], "annotations": [],
            "categories": [{"id": 10 + i, "name": n} for i, n in enumerate(names)]}
    with open(path, "w") as f:
        json.dump(data, f)


def test_custom_dataset_sets_num_classes(tmp_path):
    _coco(tmp_path / "three.json", ["a", "b", "c"], tmp_path / "img")
    _coco(tmp_path / "two.json", ["a", "b"], tmp_path / "img")
    cfg = setup_cfg(SYN_CFG, ["DATASETS.TRAIN", "('three_train',)", "DATASETS.TEST", "('three_val',)"],
                    datasets=[("three_train", str(tmp_path / "three.json"), str(tmp_path / "img")),
                              ("three_val", str(tmp_path / "three.json"), str(tmp_path / "img"))])
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 3
    rcnn = setup_cfg(os.path.join(ROOT, "configs/mask_rcnn_AA_R_50_FPN_1x.yaml"),
                     ["DATASETS.TRAIN", "('three_train',)", "DATASETS.TEST", "('three_val',)"])
    assert rcnn.MODEL.ROI_HEADS.NUM_CLASSES == 3  # the R-CNN heads follow too
    # the same through the config key
    reg = [["three_cfg", str(tmp_path / "three.json"), str(tmp_path / "img")]]
    cfg = setup_cfg(SYN_CFG, ["DATASETS.REGISTER", str(reg), "DATASETS.TRAIN", "('three_cfg',)",
                              "DATASETS.TEST", "()"])
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 3
    with pytest.raises(DatasetError, match="test dataset 'two_val' has classes"):
        setup_cfg(SYN_CFG, ["DATASETS.TRAIN", "('three_train',)", "DATASETS.TEST", "('two_val',)"],
                  datasets=[("two_val", str(tmp_path / "two.json"), str(tmp_path / "img"))])
    with pytest.raises(ConfigError, match=r"DATASETS.TRAIN names \['nowhere'\], which are not registered"):
        setup_cfg(SYN_CFG, ["DATASETS.TRAIN", "('nowhere',)", "DATASETS.TEST", "()"])


def test_synthetic_names_register_without_data_and_prepare_generates(tmp_path):
    root = str(tmp_path / "syn")
    opts = ["DATASETS.SYNTHETIC.ROOT", root, "DATASETS.SYNTHETIC.NUM_TRAIN", "3", "DATASETS.SYNTHETIC.NUM_VAL", "2",
            "DATASETS.CHECK_CACHE_DIR", str(tmp_path / "cache")]
    cfg = setup_cfg(SYN_CFG, opts)  # reading a config writes nothing
    assert cfg.MODEL.RETINANET.NUM_CLASSES == len(SYNTHETIC_CLASSES)
    assert not os.path.exists(root) and not os.path.exists(tmp_path / "cache")
    with pytest.raises(DatasetError, match="synthetic dataset is not generated"):
        DatasetCatalog.get("synthetic_val")
    cfg = setup_cfg(SYN_CFG, opts, prepare_data=True)
    assert cfg.MODEL.RETINANET.NUM_CLASSES == len(SYNTHETIC_CLASSES)
    assert os.path.isfile(os.path.join(root, "val.json"))
    assert len(os.listdir(tmp_path / "cache")) == 2  # both splits checked
    assert len(DatasetCatalog.get("synthetic_val")) == 2
    other = opts[:3] + ["4"] + opts[4:]  # DATASETS.SYNTHETIC.NUM_TRAIN 4 in the same folder
    with pytest.raises(DatasetError, match=r"syn holds a set generated with other arguments: num_train 3 \(asked 4\)"):
        setup_cfg(SYN_CFG, other, prepare_data=True)


def test_aa_config_only_changes_the_backbone(tmp_path):
    opts = ["DATASETS.SYNTHETIC.ROOT", str(tmp_path / "syn"), "DATASETS.SYNTHETIC.NUM_TRAIN", "2",
            "DATASETS.SYNTHETIC.NUM_VAL", "1"]
    base = setup_cfg(SYN_CFG, opts)
    aa = setup_cfg(SYN_CFG.replace("retinanet_R_18", "retinanet_AA_R_18"), opts)
    assert aa.MODEL.BACKBONE.NAME == "build_retinanet_aa_resnet_fpn_backbone"
    assert base.MODEL.BACKBONE.NAME == "build_retinanet_resnet_fpn_backbone"
    a, b = base.clone(), aa.clone()
    for c in (a, b):
        c.defrost()
        c.MODEL.BACKBONE.NAME = c.OUTPUT_DIR = ""
    assert a.dump() == b.dump()


def test_num_classes_follows_a_dataset_registered_in_user_code(tmp_path):
    """register_coco_instances leaves thing_classes unset until the dataset loads: NUM_CLASSES still
    follows its JSON's categories; a dataset whose classes nothing tells stops with a message."""
    from detectron2.data.datasets import register_coco_instances

    _coco(tmp_path / "four.json", ["w", "x", "y", "z"], tmp_path / "img")
    register_coco_instances("user_four", {}, str(tmp_path / "four.json"), str(tmp_path / "img"))
    cfg = setup_cfg(SYN_CFG, ["DATASETS.TRAIN", "('user_four',)", "DATASETS.TEST", "('user_four',)"])
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 4
    DatasetCatalog.register("user_unknown_classes", lambda: [])
    with pytest.raises(DatasetError, match=r"DATASETS\.TRAIN.*'user_unknown_classes'.*MODEL\.RETINANET\.NUM_CLASSES"):
        setup_cfg(SYN_CFG, ["DATASETS.TRAIN", "('user_unknown_classes',)", "DATASETS.TEST", "()"])


def test_shapes_classification_set_refuses_other_arguments(tmp_path):
    from aa_detection.data.classification import ensure_shapes_classification_set

    root = str(tmp_path / "cls")
    ensure_shapes_classification_set(root, num_train_images=3, num_val_images=1)
    with open(os.path.join(root, "DONE")) as f:
        made = json.load(f)
    counted = {split: sum(len(files) for _, _, files in os.walk(os.path.join(root, split))) for split in ("train", "val")}
    assert made["crops"] == counted and counted["train"] > 0
    assert ensure_shapes_classification_set(root, num_train_images=3, num_val_images=1) == root
    with pytest.raises(DatasetError, match=r"cls holds .* num_train_images 3 \(asked 4\)"):
        ensure_shapes_classification_set(root, num_train_images=4, num_val_images=1)
