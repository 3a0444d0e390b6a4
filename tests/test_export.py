"""Deployment: the default AA RetinaNet traced to TorchScript, saved, reloaded in a fresh process and run at
other sizes; the backbone through torch.export with dynamic sizes, and to ONNX run by onnxruntime."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from aa_detection import export  # noqa: E402
from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.layers.kernel import kernel_available  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AA_CONFIG = os.path.join(ROOT, "configs/synthetic/retinanet_AA_R_18_FPN_synthetic.yaml")
TRACE_SIZE, OTHER_SIZES = (160, 224), [(128, 192), (150, 250)]

pytestmark = [pytest.mark.skipif(not kernel_available(), reason="the default CPU path is the compiled kernel"),
              pytest.mark.slow]  # export, reload in a fresh process


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The synthetic AA-R18 RetinaNet (default MODEL.AA.IMPL, random weights), keeping every detection."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    cfg = setup_cfg(AA_CONFIG, ["DATASETS.SYNTHETIC.ROOT", root, "DATASETS.SYNTHETIC.NUM_TRAIN", "4",
                                "DATASETS.SYNTHETIC.NUM_VAL", "2", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _image(size, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=generator).float()


def test_torchscript_reloads_in_a_fresh_process_and_runs_at_other_sizes(model, tmp_path):
    path = export.export_torchscript(model, _image(TRACE_SIZE, 0), str(tmp_path / "model.ts"))
    assert sorted(os.listdir(tmp_path)) == ["model.ts", "model.ts.json"]
    images = [_image(size, i + 1) for i, size in enumerate(OTHER_SIZES)]
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch\n"
        "from aa_detection.export import load_torchscript\n"
        "run = load_torchscript(sys.argv[1])\n"
        "torch.save([run(image) for image in torch.load(sys.argv[2])], sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=ROOT)
    reloaded = torch.load(tmp_path / "out.pt")
    for image, traced in zip(images, reloaded):
        eager = export.predict(model, image)
        assert len(eager["scores"]) == 100  # the detector's DETECTIONS_PER_IMAGE: a real comparison
        for field in export.FIELDS:
            assert traced[field].shape == eager[field].shape, field
            assert (traced[field].double() - eager[field].double()).abs().max() <= 1e-4, field


def test_backbone_exports_with_dynamic_sizes(model, tmp_path):
    path = export.export_backbone(model, _image(TRACE_SIZE, 0), str(tmp_path / "backbone.pt2"))
    backbone = export.load_backbone(path)
    images = model.preprocess_image([{"image": _image((192, 256), 3)}]).tensor
    with torch.no_grad():
        eager, exported = model.backbone(images), backbone(images)
    assert set(exported) == set(eager)
    for name in eager:
        assert torch.allclose(exported[name], eager[name], atol=1e-4), name


def test_backbone_exports_to_onnx_and_runs_at_other_sizes(model, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx and onnxscript (requirements.txt)")
    pytest.importorskip("onnxruntime", reason="running the ONNX file needs onnxruntime (requirements.txt)")
    impls = {m.impl for m in model.modules() if hasattr(m, "impl")}
    path = export.export_onnx(model, _image(TRACE_SIZE, 0), str(tmp_path / "backbone.onnx"))
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == impls  # the model is left as it was
    assert os.listdir(tmp_path) == ["backbone.onnx"]  # weights inside, no temporary file left
    backbone = export.load_onnx(path)
    for i, size in enumerate(OTHER_SIZES + [(192, 256)]):
        images = model.preprocess_image([{"image": _image(size, i + 1)}]).tensor
        with torch.no_grad():
            eager = model.backbone(images)
        exported = backbone(images)
        assert list(exported) == list(eager)
        for name in eager:
            assert exported[name].shape == eager[name].shape, name
            assert (exported[name] - eager[name]).abs().max() <= 1e-4, name


def test_onnx_export_without_onnx_is_one_line_naming_the_install(tmp_path):
    """tools/export_model.py --format onnx where onnx cannot be imported: exit status 2 and one line, before
    any model is built."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['onnx'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    config = os.path.join(ROOT, "configs", "synthetic", "retinanet_R_18_FPN_synthetic.yaml")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "--config-file", config,
                             "--output", str(tmp_path / "out"), "--format", "onnx"], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()  # library warnings may come first
    assert "pip install onnx onnxscript" in lines[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
