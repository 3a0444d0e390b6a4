import os
import pickle
import re
import uuid

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402
import torchvision  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.backbone import build_resnet_backbone  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402
from iopath.common.file_io import NativePathHandler, PathHandler  # noqa: E402
from torch import nn  # noqa: E402

from aa_detection.checkpoint import AACheckpointer, pretrained_shapes  # noqa: E402
from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.errors import ConfigError, WeightsError  # noqa: E402
from aa_detection.layers import AAConv2d  # noqa: E402
from aa_detection.pretraining.convert import check_weights_format  # noqa: E402
from common import load_tool  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
pytestmark = pytest.mark.slow  # R-50 RetinaNets saved and loaded
CONFIG = os.path.join(ROOT, "configs", "retinanet_AA_R_50_FPN_1x.yaml")
BASELINE = os.path.join(ROOT, "configs", "retinanet_R_50_FPN_1x.yaml")
# R-50 with narrow bottlenecks (16, 32, 64, 128) keeps the test fast; names and structure are R-50's.
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.WIDTH_PER_GROUP", "16"]
PREFIX = "backbone.bottom_up."
ATTENTION = ("qkv", "attn_out", "attention_norm", "rel_h", "rel_w")


def _randomize_norms(module):
    """Non-trivial norm parameters and statistics, so that a test notices any that did not load."""
    g = torch.Generator().manual_seed(1)
    for name, t in module.state_dict().items():
        if "norm" in name or "bn" in name or "downsample.1" in name:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def _caffe2_name(key):
    """detectron2 ResNet name -> the MSRA Caffe2 name it is converted from (inverse of detectron2's rules)."""
    if key.startswith("stem.conv1."):
        return {"weight": "conv1_w", "norm.weight": "res_conv1_bn_s", "norm.bias": "res_conv1_bn_b"}.get(
            key[len("stem.conv1."):])
    m = re.match(r"res(\d)\.(\d+)\.(conv[123]|shortcut)\.(weight|norm\.weight|norm\.bias)$", key)
    if m is None:
        return None  # running statistics: the MSRA files fold them into scale and bias
    stage, block, conv, param = m.groups()
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[conv]
    suffix = {"weight": "w", "norm.weight": "bn_s", "norm.bias": "bn_b"}[param]
    return f"res{stage}_{block}_{branch}_{suffix}"


def _aa_model(stride_in_1x1):
    cfg = setup_cfg(CONFIG, SMALL + ["MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1)])
    return build_model(cfg)


def _check_loaded(model, before, expected, checkpointer):
    """expected: {backbone key (detectron2 name): pretrained tensor}. The AA layers' entries narrower than a
    plain ResNet's (conv branches, and their norms under FrozenBN) take the first channels."""
    after = model.state_dict()
    fitted = pretrained_shapes(model)
    assert fitted
    for key, value in expected.items():
        full = PREFIX + key
        if full in fitted:
            assert tuple(value.shape) == fitted[full]
            assert torch.equal(after[full], value[: after[full].shape[0]]), full  # the first Fout - dv channels
        else:
            assert torch.equal(after[full], value), full
    for key, value in after.items():
        if key.split(".")[-2] in ATTENTION or key.split(".")[-1] in ("rel_h", "rel_w"):
            assert torch.equal(value, before[key]), key  # attention stays at its initialisation
            if not key.endswith("num_batches_tracked"):
                assert key in checkpointer.last_load_report["random"]
    assert set(checkpointer.last_load_report["sliced"]) == {PREFIX + k for k in expected} & set(fitted)
    random = checkpointer.last_load_report["random"]
    assert not any(k.startswith(PREFIX) and k.split(".")[-2] not in ATTENTION and "rel_" not in k
                   and "running" not in k for k in random)


def test_a_missing_weights_file_is_a_weights_error_naming_it(tmp_path):
    """For every tool that loads weights through AACheckpointer (training, evaluation, export, the demo):
    fvcore's own check is an AssertionError."""
    missing = str(tmp_path / "model_final.pth")
    with pytest.raises(WeightsError, match=f"weights file not found: {re.escape(missing)}"):
        AACheckpointer(nn.Linear(2, 2)).load(missing)
    assert AACheckpointer(nn.Linear(2, 2)).load("") == {}  # no weights asked for: the initialisation stays


def test_msra_caffe2_pkl_loads_into_aa_resnet(tmp_path):
    plain_cfg = setup_cfg(BASELINE, SMALL)
    plain = build_resnet_backbone(plain_cfg, ShapeSpec(channels=3))
    _randomize_norms(plain)
    c2 = {}
    expected = {}
    for key, value in plain.state_dict().items():
        name = _caffe2_name(key)
        if name is not None:
            c2[name] = value.numpy().copy()
            expected[key] = value.clone()
    c2["fc1000_w"], c2["fc1000_b"] = torch.randn(1000, 2048).numpy(), torch.zeros(1000).numpy()
    path = str(tmp_path / "R-50-msra.pkl")
    with open(path, "wb") as f:
        pickle.dump(c2, f)

    model = _aa_model(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = AACheckpointer(model)
    checkpointer.load(path)
    _check_loaded(model, before, expected, checkpointer)


def test_msra_pkl_converted_loads_through_detectron2s_own_checkpointer(tmp_path):
    """tools/convert_pretrained_to_d2.py fits an MSRA Caffe2 .pkl to the AA config's shapes, so detectron2's
    own DetectionCheckpointer (its tools after `import aa_detection`) loads every convolution and norm of
    the backbone: nothing skipped for its shape, the AA layers' conv branches their first filters. The
    metadata beside it (BGR, MSRA mean, std 1) passes the COCO config's check and fails an RGB one."""
    plain = build_resnet_backbone(setup_cfg(BASELINE, SMALL), ShapeSpec(channels=3))
    _randomize_norms(plain)
    blobs = {_caffe2_name(k): v.numpy().copy() for k, v in plain.state_dict().items() if _caffe2_name(k)}
    expected = {k: v.clone() for k, v in plain.state_dict().items() if _caffe2_name(k)}
    blobs["pred_w"], blobs["pred_b"] = torch.randn(1000, 2048).numpy(), torch.zeros(1000).numpy()
    src, dst = str(tmp_path / "R-50.pkl"), str(tmp_path / "R-50-aa.pth")
    with open(src, "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    cfg = setup_cfg(CONFIG, SMALL)
    load_tool("convert_pretrained_to_d2").main([src, dst, "--config-file", CONFIG, *SMALL])
    check_weights_format(cfg, dst)
    with pytest.raises(ConfigError, match="INPUT.FORMAT is 'RGB', the weights need 'BGR'"):
        check_weights_format(setup_cfg(CONFIG, SMALL + ["INPUT.FORMAT", "RGB"]), dst)

    model = build_model(cfg)
    DetectionCheckpointer(model).load(dst)
    after = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(after[PREFIX + key], value[: after[PREFIX + key].shape[0]]), key


def test_torchvision_converted_weights_load_into_aa_resnet(tmp_path):
    from aa_detection.pretraining.convert import convert_pretrained

    tv = torchvision.models.resnet50(weights=None, width_per_group=16)
    _randomize_norms(tv)
    pth, converted = str(tmp_path / "resnet50.pth"), str(tmp_path / "resnet50_d2.pth")
    torch.save(tv.state_dict(), pth)
    convert_pretrained(pth, converted)
    expected = {k[len(PREFIX):]: v for k, v in torch.load(converted)["model"].items()}

    model = _aa_model(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = AACheckpointer(model)
    checkpointer.load(converted)
    _check_loaded(model, before, expected, checkpointer)


def test_plain_retinanet_state_dict_loads_into_aa_retinanet(tmp_path):
    plain = build_model(setup_cfg(BASELINE, SMALL))
    _randomize_norms(plain)
    path = str(tmp_path / "retinanet_r50.pth")
    torch.save({"model": plain.state_dict()}, path)

    model = _aa_model(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = AACheckpointer(model)
    checkpointer.load(path)
    backbone = {k[len(PREFIX):]: v for k, v in plain.state_dict().items() if k.startswith(PREFIX)}
    _check_loaded(model, before, backbone, checkpointer)
    after = model.state_dict()
    for key, value in plain.state_dict().items():
        if not key.startswith(PREFIX):
            assert torch.equal(after[key], value), key  # FPN and head load whole too


def test_aa_checkpoint_resumes_without_slicing(tmp_path):
    source = _aa_model(True)
    path = str(tmp_path / "aa.pth")
    torch.save({"model": source.state_dict()}, path)
    model = _aa_model(True)
    checkpointer = AACheckpointer(model)
    checkpointer.load(path)
    assert checkpointer.last_load_report["sliced"] == {}
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


class _DirectoryStore(PathHandler):
    """Paths "PREFIX://key" kept under a local directory: a stand-in for a remote store registered
    with detectron2's PathManager."""

    def __init__(self, prefix, root):
        super().__init__()
        self.prefix, self.root, self.native = prefix, root, NativePathHandler()

    def _get_supported_prefixes(self):
        return [self.prefix]

    def _local(self, path):
        return os.path.join(self.root, path[len(self.prefix):])

    def _open(self, path, mode="r", **kwargs):
        return self.native._open(self._local(path), mode, **kwargs)

    def _get_local_path(self, path, force=False, **kwargs):
        return self._local(path)

    def _exists(self, path, **kwargs):
        return self.native._exists(self._local(path), **kwargs)

    def _isfile(self, path, **kwargs):
        return self.native._isfile(self._local(path), **kwargs)

    def _isdir(self, path, **kwargs):
        return self.native._isdir(self._local(path), **kwargs)

    def _ls(self, path, **kwargs):
        return self.native._ls(self._local(path), **kwargs)

    def _mkdirs(self, path, **kwargs):
        return self.native._mkdirs(self._local(path), **kwargs)


def test_checkpoints_save_and_resume_through_a_registered_path_handler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prefix = f"aastore{uuid.uuid4().hex[:8]}://"
    PathManager.register_handler(_DirectoryStore(prefix, str(tmp_path / "store")))
    PathManager.mkdirs(prefix + "run")
    model = nn.Linear(2, 2)
    AACheckpointer(model, prefix + "run").save("model_0000001", iteration=1)
    assert sorted(os.listdir(tmp_path)) == ["store"]  # nothing written to a local path named like the URL
    assert sorted(os.listdir(tmp_path / "store" / "run")) == ["last_checkpoint", "model_0000001.pth"]

    resumed = AACheckpointer(nn.Linear(2, 2), prefix + "run")
    assert resumed.get_checkpoint_file() == prefix + "run/model_0000001.pth"
    assert resumed.resume_or_load("", resume=True)["iteration"] == 1
    assert torch.equal(resumed.model.weight, model.weight)
