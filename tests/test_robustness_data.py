"""Messy COCO-format datasets: each problem is handled as documented or stops with a message naming it."""
import json
import logging
import os

import numpy as np
import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog  # noqa: E402
from detectron2.data.build import get_detection_dataset_dicts  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from PIL import Image  # noqa: E402

from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.data.validation import check_image  # noqa: E402
from aa_detection.errors import DatasetError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN_CFG = os.path.join(ROOT, "configs/synthetic/retinanet_R_18_FPN_synthetic.yaml")
_counter = [0]


@pytest.fixture
def log_lines():
    lines = []

    class Handler(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Handler(level=logging.INFO)
    logger = logging.getLogger("aa_detection.data.validation")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _image(path, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(path)


def _dataset(tmp_path, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 2, "name": "b"})):
    """Write a COCO JSON; `images` is [(id, file_name, width, height)], `annotations` [(id, image_id, bbox, cat)]."""
    data = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [{"id": a, "image_id": i, "bbox": list(b), "category_id": c, "area": 1.0, "iscrowd": 0}
                        for a, i, b, c in annotations],
        "categories": list(categories),
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


def _setup(json_file, image_root, *opts, prepare_data=False):
    """Register the dataset under a fresh name through setup_cfg, as the tools do; returns (cfg, name)."""
    _counter[0] += 1
    name = f"messy_{_counter[0]}"
    cache = os.path.join(os.path.dirname(json_file), "check_cache")
    cfg = setup_cfg(SYN_CFG, ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()",
                              "DATASETS.CHECK_CACHE_DIR", cache, "DATASETS.CHECK_IMAGES", "decode", *opts],
                    datasets=[(name, json_file, str(image_root))], prepare_data=prepare_data)
    return cfg, name


# ---- the JSON file -------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ("", "the file is empty"),
    ('{"images": [', "not valid JSON"),
    ("[1, 2]", "got a JSON list"),
    ('{"images": []}', "'categories' is missing"),
    ('{"categories": [{"id": 1, "name": "a"}]}', "'images' is missing"),
    ('{"images": [{"id": 4, "file_name": "a.png", "width": 10}], "categories": [{"id": 1, "name": "a"}]}',
     "image id 4 (a.png): 'height' must be a positive integer"),
    ('{"images": [{"id": 4, "width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}]}',
     "image id 4 has no 'file_name'"),
    ('{"images": [{"id": 4, "file_name": "a.png", "width": 10, "height": 10}, {"id": 4, "file_name": "b.png", '
     '"width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}]}', "image id 4 appears twice"),
    ('{"images": [{"id": 4, "file_name": "a.png", "width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}],'
     ' "annotations": [{"image_id": 4, "bbox": [0, 0, 1, 1], "category_id": 1}]}', "annotation #0"),
    ('{"images": [{"id": 4, "file_name": "a.png", "width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}],'
     ' "annotations": [{"id": 9, "image_id": 4, "bbox": [0, 0, 1, 1], "category_id": 5}]}',
     "annotation id 9: category_id 5 is not in 'categories'"),
    ('{"images": [{"id": 4, "file_name": "a.png", "width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}],'
     ' "annotations": [{"id": 9, "image_id": 8, "bbox": [0, 0, 1, 1], "category_id": 1}]}',
     "annotation id 9: image_id 8 is not the id of any image"),
    ('{"images": [{"id": 4, "file_name": "a.png", "width": 10, "height": 10}], "categories": [{"id": 1, "name": "a"}],'
     ' "annotations": [{"id": 9, "image_id": 4, "bbox": [0, 0, 1], "category_id": 1}]}',
     "annotation id 9: 'bbox' must be [x, y, width, height]"),
])
def test_malformed_json_is_refused_at_setup_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        _setup(str(path), tmp_path)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_missing_json_or_image_folder_is_refused_at_setup(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(DatasetError, match=f"annotation file not found: {tmp_path / 'gone.json'}"):
        _setup(str(tmp_path / "gone.json"), tmp_path / "img")
    json_file = _dataset(tmp_path, [(1, "a.png", 40, 30)], [])
    with pytest.raises(DatasetError, match=f"image folder not found: {tmp_path / 'no_images'}"):
        _setup(json_file, tmp_path / "no_images")


# ---- images --------------------------------------------------------------------------------------

@pytest.fixture
def messy_images(tmp_path):
    """Five good-or-bad images: id 1 fine, 2 missing, 3 not an image, 4 truncated, 5 size mismatch."""
    img = tmp_path / "img"
    img.mkdir()
    _image(img / "good.png")
    (img / "text.jpg").write_text("this is not an image")
    _image(img / "whole.jpg")
    data = (img / "whole.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _image(img / "other_size.png", size=(50, 30))
    images = [(1, "good.png", 40, 30), (2, "missing.png", 40, 30), (3, "text.jpg", 40, 30),
              (4, "truncated.jpg", 40, 30), (5, "other_size.png", 40, 30)]
    anns = [(10 + i, i, (5, 5, 10, 10), 1) for i in range(1, 6)]
    return _dataset(tmp_path, images, anns), img


@pytest.mark.parametrize("image_id, file_name, problem", [
    (2, "missing.png", "file not found"),
    (3, "text.jpg", "not an image file"),
    (4, "truncated.jpg", "truncated or corrupt image"),
    (5, "other_size.png", "its size is 50x30 (width x height) but the JSON says 40x30"),
])
def test_each_bad_image_stops_loading_naming_its_id_and_file(tmp_path, messy_images, image_id, file_name, problem):
    json_file, img = messy_images
    # keep only the good image and the one under test
    data = json.loads(open(json_file).read())
    data["images"] = [d for d in data["images"] if d["id"] in (1, image_id)]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in (1, image_id)]
    path = tmp_path / f"one_bad_{image_id}.json"
    path.write_text(json.dumps(data))
    _, name = _setup(str(path), img)  # the JSON is fine: setup succeeds, loading checks the images
    with pytest.raises(DatasetError) as info:
        DatasetCatalog.get(name)
    msg = str(info.value)
    assert f"image id {image_id}" in msg and file_name in msg and problem in msg and str(path) in msg, msg
    assert "DATASETS.BAD_IMAGES skip" in msg


def test_skip_leaves_bad_images_out_and_counts_them(messy_images, log_lines):
    json_file, img = messy_images
    cfg, name = _setup(json_file, img, "DATASETS.BAD_IMAGES", "skip")
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [1]
    summary = [line for line in log_lines if "checked" in line]
    assert summary and "4 bad images skipped (ids [2, 3, 4, 5])" in summary[-1], log_lines
    assert sum("skipped" in line and "image id" in line for line in log_lines) == 4
    # the training loader is built on what is left
    mapped = DatasetMapper(cfg, is_train=True)(dicts[0])
    assert mapped["image"].shape[0] == 3


def test_header_check_misses_truncation_but_catches_size(messy_images):
    json_file, img = messy_images
    assert check_image(str(img / "truncated.jpg"), 40, 30, "header") is None
    assert "truncated" in check_image(str(img / "truncated.jpg"), 40, 30, "decode")
    assert "50x30" in check_image(str(img / "other_size.png"), 40, 30, "header")
    (img / "a_folder.png").mkdir()
    assert check_image(str(img / "a_folder.png"), 40, 30) == "not a file"


@pytest.mark.parametrize("fmt", ["BGR", "RGB"])
def test_grayscale_and_rgba_images_are_read_as_three_channels(tmp_path, fmt):
    img = tmp_path / "img"
    img.mkdir()
    _image(img / "gray.png", mode="L")
    _image(img / "rgba.png", mode="RGBA")
    json_file = _dataset(tmp_path, [(1, "gray.png", 40, 30), (2, "rgba.png", 40, 30)],
                         [(1, 1, (2, 2, 10, 10), 1), (2, 2, (2, 2, 10, 10), 2)])
    cfg, name = _setup(json_file, img, "INPUT.FORMAT", fmt)
    mapper = DatasetMapper(cfg, is_train=True)
    for d in DatasetCatalog.get(name):
        out = mapper(d)
        assert out["image"].shape[0] == 3 and len(out["instances"]) == 1


# ---- annotations ---------------------------------------------------------------------------------

def test_degenerate_and_outside_boxes(tmp_path, log_lines):
    img = tmp_path / "img"
    img.mkdir()
    _image(img / "a.png", size=(40, 30))
    anns = [
        (1, 1, (5, 5, 10, 10), 1),     # fine
        (2, 1, (5, 5, 0, 10), 1),      # zero width: dropped
        (3, 1, (5, 5, 10, -4), 2),     # negative height: dropped
        (4, 1, (30, 20, 20, 20), 2),   # reaches outside: clipped to (30, 20, 10, 10)
        (5, 1, (-5, -5, 10, 10), 1),   # reaches outside: clipped to (0, 0, 5, 5)
        (6, 1, (50, 5, 10, 10), 1),    # entirely outside: dropped
    ]
    _, name = _setup(_dataset(tmp_path, [(1, "a.png", 40, 30)], anns), img)
    (record,) = DatasetCatalog.get(name)
    boxes = {a["id"]: a["bbox"] for a in record["annotations"]}
    assert boxes == {1: [5, 5, 10, 10], 4: [30, 20, 10, 10], 5: [0, 0, 5, 5]}
    text = "\n".join(log_lines)
    for ann_id, what in [(2, "zero or negative"), (3, "zero or negative"), (4, "clipped"), (5, "clipped"),
                         (6, "outside")]:
        assert f"annotation id {ann_id} of image id 1" in text and what in text
    assert "2 annotations dropped (zero or negative size)" in text and "1 annotations dropped (outside the image)" in text


def test_images_without_annotations_are_kept_for_evaluation_and_filtered_for_training(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    _image(img / "a.png")
    _image(img / "b.png")
    _image(img / "c.png")
    anns = [(1, 1, (5, 5, 10, 10), 1), (2, 3, (5, 5, 0, 10), 1)]  # image 3's only box is degenerate
    _, name = _setup(_dataset(tmp_path, [(1, "a.png", 40, 30), (2, "b.png", 40, 30), (3, "c.png", 40, 30)],
                              anns), img)
    assert [d["image_id"] for d in DatasetCatalog.get(name)] == [1, 2, 3]
    assert [d["image_id"] for d in get_detection_dataset_dicts(name, filter_empty=True)] == [1]
    assert len(get_detection_dataset_dicts(name, filter_empty=False)) == 3


def test_non_contiguous_category_ids_map_to_contiguous_classes(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    _image(img / "a.png")
    cats = [{"id": 42, "name": "z"}, {"id": 3, "name": "x"}, {"id": 7, "name": "y"}]
    anns = [(1, 1, (1, 1, 5, 5), 3), (2, 1, (1, 1, 6, 6), 7), (3, 1, (1, 1, 7, 7), 42)]
    cfg, name = _setup(_dataset(tmp_path, [(1, "a.png", 40, 30)], anns, cats), img)
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 3
    (record,) = DatasetCatalog.get(name)
    assert [a["category_id"] for a in record["annotations"]] == [0, 1, 2]
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["x", "y", "z"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 42: 2}


@pytest.mark.slow  # runs the tools in their own processes
def test_train_net_stops_before_training_on_a_bad_image(tmp_path, messy_images):
    import subprocess
    import sys

    json_file, img = messy_images
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", SYN_CFG,
         "--dataset", "messy_cli", json_file, str(img), "DATASETS.TRAIN", "('messy_cli',)", "DATASETS.TEST", "()",
         "SOLVER.MAX_ITER", "1", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ERROR (DatasetError): dataset 'messy_cli'" in proc.stderr and "image id 2 (" in proc.stderr
    assert "missing.png): file not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(f.startswith("model_") for f in os.listdir(out))


# ---- checks once per version of the files ----------------------------------------------------------

def test_check_is_cached_per_version_of_the_files(tmp_path, messy_images):
    json_file, img = messy_images
    cfg, name = _setup(json_file, img, "DATASETS.BAD_IMAGES", "skip")
    assert [d["image_id"] for d in DatasetCatalog.get(name)] == [1]
    (cache_file,) = os.listdir(cfg.DATASETS.CHECK_CACHE_DIR)
    # later loads read the cache, not the JSON: garbage of the same size and time is not seen
    stat = os.stat(json_file)
    original = open(json_file).read()
    with open(json_file, "w") as f:
        f.write("x" * stat.st_size)
    os.utime(json_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    records = DatasetCatalog.get(name)
    assert [d["image_id"] for d in records] == [1] and records[0]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    _, again = _setup(json_file, img, "DATASETS.BAD_IMAGES", "skip")  # registration reads the classes there too
    assert MetadataCatalog.get(again).thing_classes == ["a", "b"]
    # a new version of the JSON is checked again, in the same cache file
    data = json.loads(original)
    data["images"] = [im for im in data["images"] if im["id"] in (1, 5)]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in (1, 5)]
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetError, match="image id 5"):
        _setup(json_file, img, prepare_data=True)
    assert os.listdir(cfg.DATASETS.CHECK_CACHE_DIR) == [cache_file]


# ---- several processes ---------------------------------------------------------------------------

def _train_args(json_file, img, out, name):
    return ["--config-file", SYN_CFG, "--num-gpus", "2", "--dataset", name, json_file, str(img),
            "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "DATASETS.CHECK_CACHE_DIR", str(out / "cache"),
            "SOLVER.MAX_ITER", "1", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]


@pytest.mark.slow  # runs the tools in their own processes
def test_two_processes_report_a_bad_dataset_once(tmp_path, messy_images):
    import subprocess
    import sys

    json_file, img = messy_images
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/train_net.py"),
                           *_train_args(json_file, img, tmp_path / "out", "messy_2p")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("ERROR") == 1 and "ERROR (DatasetError): dataset 'messy_2p'" in proc.stderr
    assert "image id 2 (" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # runs the tools in their own processes
def test_a_user_error_in_a_worker_is_raised_once_by_the_launching_process(tmp_path, messy_images):
    from aa_detection.engine.trainer import argument_parser, main
    from aa_detection.errors import launch_reporting_user_errors

    json_file, img = messy_images
    args = argument_parser().parse_args(_train_args(json_file, img, tmp_path / "out", "messy_worker"))
    # no check before the launch here: the first worker finds the bad image, the other waits for it
    with pytest.raises(DatasetError, match=r"dataset 'messy_worker' .*image id 2 \(.*missing.png\): file not found"):
        launch_reporting_user_errors(main, 2, dist_url="auto", args=(args,))
