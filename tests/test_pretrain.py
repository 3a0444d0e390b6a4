"""Pretraining AA-ResNet classifiers (timm) and converting them to detectron2 weights."""
import json
import os
import re

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
import torch  # noqa: E402
import torchvision  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import aa_detection.pretraining.classifiers  # noqa: E402,F401
from aa_detection.checkpoint import AACheckpointer  # noqa: E402
from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.data.classification import ensure_shapes_classification_set  # noqa: E402
from aa_detection.errors import ConfigError, DatasetError, WeightsError  # noqa: E402
from aa_detection.layers import AAConv2d  # noqa: E402
from aa_detection.pretraining.train import build_argument_parser, pretrain  # noqa: E402
from aa_detection.pretraining.convert import check_weights_format, convert_pretrained  # noqa: E402

pytestmark = pytest.mark.slow  # pretraining runs

ROOT = os.path.join(os.path.dirname(__file__), "..")
AA_CONFIG = os.path.join(ROOT, "configs", "synthetic", "retinanet_AA_R_18_FPN_synthetic.yaml")
PLAIN_CONFIG = os.path.join(ROOT, "configs", "synthetic", "retinanet_R_18_FPN_synthetic.yaml")
# A narrow ResNet-50 (all the structure, a fraction of the compute) with 2 heads.
TINY = ["--model", "aa_resnet50", "--width-per-group", "8", "--stem-out-channels", "16", "--res2-out-channels", "32",
        "--num-heads", "2", "--kappa", "0.25", "--upsilon", "0.25", "--aa-stages", "res4", "res5",
        "--downsample-stages"]
TINY_CFG = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.RESNETS.STRIDE_IN_1X1", "False", "MODEL.AA.NUM_HEADS", "2",
            "MODEL.AA.KAPPA", "0.25", "MODEL.AA.UPSILON", "0.25", "MODEL.AA.STAGES", "['res4', 'res5']",
            "MODEL.AA.DOWNSAMPLE_STAGES", "[]", "INPUT.FORMAT", "RGB",
            "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]", "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]",
            "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]


def _args(data, output, *extra):
    return build_argument_parser().parse_args(
        ["--data", data, "--output", output, "--img-size", "64", "--batch-size", "16", "--workers", "0",
         "--lr", "0.005", "--warmup-epochs", "0", "--opt", "adamw", "--weight-decay", "0.0", "--smoothing", "0",
         "--log-interval", "5", "--no-aug", *TINY, *extra])


def _metrics(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_classification_set(str(tmp_path_factory.mktemp("cls") / "shapes"), 150, 16)


@pytest.fixture(scope="module")
def pretrained_run(shapes, tmp_path_factory):
    """An 8-epoch run killed after epoch 4 (--max-epochs 4) and resumed: (output folder, records after the kill)."""
    output = str(tmp_path_factory.mktemp("run"))
    pretrain(_args(shapes, output, "--epochs", "8", "--max-epochs", "4", "--ema", "--ema-decay", "0.5"))
    interrupted = _metrics(output)
    pretrain(_args(shapes, output, "--epochs", "8", "--ema", "--ema-decay", "0.5", "--resume"))
    return output, interrupted


def test_timm_models_share_names_with_their_plain_twins():
    aa = timm.create_model("aa_resnet18", num_classes=7)
    plain = timm.create_model("d2_resnet18", num_classes=7)
    assert aa.pretrained_cfg["classifier"] == "linear" and aa.pretrained_cfg["input_size"] == (3, 224, 224)
    assert aa.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert aa(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    attention = {k for k in aa.state_dict() if k.split(".")[-2] in ("qkv", "attn_out") or k.endswith(("rel_h", "rel_w"))}
    assert attention and not any(isinstance(m, AAConv2d) for m in plain.modules())
    assert set(plain.state_dict()) == set(aa.state_dict()) - attention
    # the res3 tables of a 224 px model: 224 / (8 * 2, downsampled) = 14 offsets a side -> 27 rows
    assert aa.res3[0].conv1.rel_h.shape[0] == 27 and aa.res5[0].conv1.rel_h.shape[0] == 2 * 7 - 1
    headless = timm.create_model("aa_resnet18", num_classes=0, num_heads=4)
    assert headless(torch.randn(2, 3, 32, 32)).shape == (2, 512) and headless.res5[0].conv2.num_heads == 4


def test_pretraining_resumes(pretrained_run):
    output, interrupted = pretrained_run
    assert [r["epoch"] for r in interrupted] == [0, 1, 2, 3]
    records = _metrics(output)
    assert [r["epoch"] for r in records] == list(range(8))
    assert records[:4] == interrupted  # the resumed run appended, it did not restart
    last = torch.load(os.path.join(output, "last.pth"), weights_only=True)
    assert last["epoch"] == 8 and last["ema"] is not None and last["seed"] == 0
    assert records[-1]["lr"] < records[0]["lr"]  # the schedule went on from the resumed epoch
    assert os.path.isfile(os.path.join(output, "best.pth"))


def test_pretraining_learns(pretrained_run):
    output, _ = pretrained_run
    # 5 classes: chance is 20 %; 150 training images (about 680 crops), 8 epochs at 64 px
    assert _metrics(output)[-1]["top1"] >= 45.0


def test_pretraining_records_attention_liveness(pretrained_run):
    """Every epoch's record carries the liveness of its last training step per AA stage; with the default
    initialisation every attention channel stays alive through the 8 epochs."""
    output, _ = pretrained_run
    expected = {f"attention/{stage}/{key}" for stage in ("res4", "res5") for key in ("alive", "attention_to_conv")}
    for record in _metrics(output):
        assert {k for k in record if k.startswith("attention/")} == expected
        assert record["attention/res4/alive"] == record["attention/res5/alive"] == 1.0, record
        # the attention channels' output on the scale of the convolution channels' (0.1 at a small start)
        assert record["attention/res4/attention_to_conv"] > 0.5 and record["attention/res5/attention_to_conv"] > 0.5


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_converted_classifier_is_the_detection_backbone(pretrained_run, tmp_path, norm):
    """The converted classifier gives the detector's backbone its very features: with a trained norm over
    each augmented convolution, and under FrozenBN (the COCO configs), where the attention channels' norm
    takes the classifier's statistics of them. detectron2's own checkpointer loads it with nothing random."""
    output, _ = pretrained_run
    cfg = setup_cfg(AA_CONFIG, TINY_CFG + ["MODEL.RESNETS.NORM", norm])
    dst = str(tmp_path / "aa_r50_tiny.pth")
    convert_pretrained(os.path.join(output, "last.pth"), dst, cfg=cfg)
    check_weights_format(cfg, dst)  # fits: no error
    model = build_model(cfg).eval()
    checkpointer = AACheckpointer(model)
    checkpointer.load(dst)
    assert not [k for k in checkpointer.last_load_report["random"] if k.startswith("backbone.bottom_up.")]
    own = build_model(cfg)
    DetectionCheckpointer(own).load(dst)
    loaded = own.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("backbone.bottom_up.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key

    ckpt = torch.load(os.path.join(output, "last.pth"), weights_only=True)
    classifier = timm.create_model("aa_resnet50", num_classes=ckpt["num_classes"], **ckpt["model_kwargs"]).eval()
    classifier.load_state_dict(ckpt["ema"])
    bottom_up = model.backbone.bottom_up.state_dict()
    for key, value in classifier.state_dict().items():
        if key.startswith("linear.") or key.endswith("num_batches_tracked"):
            continue
        if key.endswith(("rel_h", "rel_w")):  # 64 px tables grown for the config's 256 px: centre rows kept
            rows, mid = value.shape[0], bottom_up[key].shape[0] // 2
            assert torch.equal(bottom_up[key][mid - rows // 2: mid + rows // 2 + 1], value), key
        elif bottom_up[key].shape != value.shape:  # under FrozenBN: the norms of the two branches
            attention_key = key.replace(".norm.", ".attention_norm.")
            assert torch.equal(torch.cat([bottom_up[key], bottom_up[attention_key]]), value), key
        else:
            assert torch.equal(bottom_up[key], value), key
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        expected = classifier.forward_features(x)
        got = model.backbone.bottom_up(x)["res5"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_data_folder_without_its_splits_is_named(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "square").mkdir()
    torchvision.utils.save_image(torch.rand(3, 8, 8), str(tmp_path / "square" / "0.png"))
    with pytest.raises(DatasetError, match=re.escape(f"--data {tmp_path}: no train/ folder")):  # images, no splits
        pretrain(_args(str(tmp_path), str(out)))
    (tmp_path / "train" / "square").mkdir(parents=True)
    with pytest.raises(DatasetError, match=re.escape(f"--data {tmp_path}: Found 0 images")):  # an empty split
        pretrain(_args(str(tmp_path), str(out)))
    torchvision.utils.save_image(torch.rand(3, 8, 8), str(tmp_path / "train" / "square" / "0.png"))
    with pytest.raises(DatasetError, match=re.escape(f"--data {tmp_path}: no val/ folder")):
        pretrain(_args(str(tmp_path), str(out)))
    assert not out.exists()  # checked before the output folder is made


def test_other_architecture_or_format_is_refused(pretrained_run, tmp_path):
    output, _ = pretrained_run
    src = os.path.join(output, "last.pth")
    with pytest.raises(ConfigError, match=r"res4.0.conv2.*num_heads=2.*num_heads=4.*MODEL.AA.NUM_HEADS"):
        convert_pretrained(src, str(tmp_path / "x.pth"), cfg=setup_cfg(AA_CONFIG, TINY_CFG + ["MODEL.AA.NUM_HEADS", "4"]))
    with pytest.raises(ConfigError, match=r"attention stages: weights \['res4', 'res5'\], model \['res5'\]"):
        convert_pretrained(src, str(tmp_path / "x.pth"), cfg=setup_cfg(AA_CONFIG, TINY_CFG + ["MODEL.AA.STAGES",
                                                                                             "['res5']"]))
    dst = str(tmp_path / "ok.pth")
    convert_pretrained(src, dst, cfg=setup_cfg(AA_CONFIG, TINY_CFG))
    bgr = setup_cfg(AA_CONFIG, TINY_CFG + ["INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]"])
    with pytest.raises(ConfigError, match=r"PIXEL_MEAN is \[103.53, 116.28, 123.675\], the weights need "
                                          r"\[123.675, 116.28, 103.53\].*INPUT.FORMAT is 'BGR'.*'RGB'"):
        check_weights_format(bgr, dst)
    with pytest.raises(ConfigError, match=r"depth: weights ResNet-50, model ResNet-18"):
        check_weights_format(setup_cfg(AA_CONFIG, ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]), dst)
    check_weights_format(setup_cfg(AA_CONFIG, TINY_CFG + ["INPUT.MAX_SIZE_TEST", "512"]), dst)  # tables resize

    sidecar = tmp_path / "ok.json"
    sidecar.write_text('{"pixel_mean": [1, 2')  # torn
    with pytest.raises(WeightsError, match=re.escape(f"{sidecar}: the metadata beside {dst} cannot be read")):
        check_weights_format(bgr, dst)
    sidecar.write_text('{"iteration": 3}')  # a .json of something else: nothing to check against
    check_weights_format(bgr, dst)


def test_torchvision_resnet_converts_to_the_same_features(tmp_path):
    tv = torchvision.models.resnet18(num_classes=3).eval()
    for m in tv.modules():  # non-trivial statistics, so that any norm left unloaded shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    src, dst = str(tmp_path / "r18.pth"), str(tmp_path / "r18_d2.pth")
    torch.save(tv.state_dict(), src)
    cfg = setup_cfg(PLAIN_CONFIG, TINY_CFG[-10:])  # RGB format, ImageNet mean/std, no datasets
    convert_pretrained(src, dst, cfg=cfg)
    model = build_model(cfg).eval()
    checkpointer = AACheckpointer(model)
    checkpointer.load(dst)
    assert not [k for k in checkpointer.last_load_report["random"] if k.startswith("backbone.bottom_up.")]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(tv.children())[:-2])(x)
        got = model.backbone.bottom_up(x)["res5"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(WeightsError, match="not a torchvision/timm-style ResNet"):
        torch.save({"layer1.0.conv1.weight": torch.zeros(1), "conv1.0.weight": torch.zeros(1)}, src)
        convert_pretrained(src, dst)
    torch.save(model.backbone.bottom_up.state_dict(), src)  # detectron2 names, not a classifier checkpoint
    with pytest.raises(WeightsError, match=r"r18\.pth: neither an aa_detection.pretraining.train checkpoint"):
        convert_pretrained(src, dst)


def test_no_aug_evaluates_on_the_framing_it_trains_on(shapes):
    """With --no-aug timm trains on whole images resized to --img-size; the evaluation shows the same pixels
    (crop 1.0), not a 1/0.875 zoom of them; --crop-pct still chooses."""
    from PIL import Image

    from aa_detection.pretraining.train import _loaders, _split_dataset

    device = torch.device("cpu")
    data_config = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                   "crop_pct": 0.875}
    sets = [_split_dataset(shapes, split) for split in ("train", "val")]
    image = Image.open(sets[1].reader.samples[0][0]).convert("RGB")
    framings = {}
    for extra in ((), ("--crop-pct", "0.875")):
        args = _args(shapes, "unused", *extra)
        train, val = _loaders(args, data_config, *sets, device, False)
        framings[extra] = [loader.dataset.transform(image) for loader in (train, val)]
    trained, evaluated = framings[()]
    assert torch.equal(trained, evaluated)
    assert not torch.equal(*framings[("--crop-pct", "0.875")])
