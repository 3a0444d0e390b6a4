"""tools/demo.py as a user runs it: images from files, globs and folders, a video, a missing webcam."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from common import ROOT  # noqa: E402

CONFIG = os.path.join(ROOT, "configs/synthetic/retinanet_AA_R_18_FPN_synthetic.yaml")
pytestmark = pytest.mark.slow  # each test runs the tool in its own processes


def _demo(tmp_path, *args, opts=()):
    """Run the demo (random weights: every detection above a low threshold is drawn)."""
    opts = ["DATASETS.SYNTHETIC.ROOT", str(tmp_path / "data"), "DATASETS.SYNTHETIC.NUM_TRAIN", "2",
            "DATASETS.SYNTHETIC.NUM_VAL", "2", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", *opts]
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools/demo.py"), "--config-file", CONFIG,
                           "--confidence-threshold", "0.005", *args, *opts],
                          capture_output=True, text=True, cwd=ROOT)


def _images(folder, count, size=(96, 128)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        cv2.imwrite(os.path.join(folder, f"im{i}.png"), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return folder


def test_images_from_a_file_a_glob_and_a_folder(tmp_path):
    folder = _images(str(tmp_path / "in"), 3)
    out = tmp_path / "out"
    result = _demo(tmp_path, "--input", os.path.join(folder, "im0.png"), os.path.join(folder, "im1*"), folder,
                   "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["im0.png", "im1.png", "im2.png"]
    assert result.stdout.count("detections") == 5  # im0, im1, then the folder's three
    drawn = cv2.imread(str(out / "im2.png"))
    assert drawn.shape == (96, 128, 3)
    assert not np.array_equal(drawn, cv2.imread(os.path.join(folder, "im2.png")))  # boxes were drawn


def test_video_in_video_out(tmp_path):
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (128, 96))
    for i in range(4):
        writer.write(np.full((96, 128, 3), 40 * i, np.uint8))
    writer.release()
    out = str(tmp_path / "detections.mp4")
    result = _demo(tmp_path, "--video-input", video, "--output", out)
    assert result.returncode == 0, result.stderr
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # written through a temporary file
    capture = cv2.VideoCapture(out)
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    assert (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (128, 96)


def test_bad_inputs_exit_2_with_a_message(tmp_path):
    missing = _demo(tmp_path, "--input", str(tmp_path / "nothing*.jpg"), "--output", str(tmp_path / "o"))
    assert missing.returncode == 2 and "no images found" in missing.stderr and "Traceback" not in missing.stderr
    no_output = _demo(tmp_path, "--video-input", "clip.mp4")
    assert no_output.returncode == 2 and "--output" in no_output.stderr
    no_video = _demo(tmp_path, "--video-input", str(tmp_path / "none.mp4"), "--output", str(tmp_path / "v.mp4"))
    assert no_video.returncode == 2 and "cannot open the video" in no_video.stderr
    weights = str(tmp_path / "model_final.pth")
    no_weights = _demo(tmp_path, "--input", _images(str(tmp_path / "in"), 1), "--output", str(tmp_path / "o"),
                       opts=["MODEL.WEIGHTS", weights])
    assert no_weights.returncode == 2 and f"weights file not found: {weights}" in no_weights.stderr
    assert "Traceback" not in no_weights.stderr
