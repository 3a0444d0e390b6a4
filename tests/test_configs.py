import glob
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402
import yaml  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from aa_detection.config import _resolve, setup_cfg  # noqa: E402
from aa_detection.errors import exit_on_user_error  # noqa: E402
from aa_detection.layers import AAConv2d  # noqa: E402
from common import load_tool  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))
# the COCO RetinaNet configs (the R-CNN twins: tests/test_rcnn_configs.py)
COCO_CONFIGS = [p for p in CONFIGS if os.path.dirname(p) == CONFIG_DIR and os.path.basename(p).startswith("retinanet")]
SHIPPED = ["retinanet_R_50_FPN_1x", "retinanet_AA_R_50_FPN_1x", "retinanet_R_50_FPN_3x",
           "retinanet_AA_R_50_FPN_3x", "retinanet_R_101_FPN_3x", "retinanet_AA_R_101_FPN_3x"]


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_all_shipped_configs_exist():
    names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIGS}
    assert set(SHIPPED) <= names


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=os.path.basename)
def test_config_parses_and_builds_on_cpu(path):
    cfg = setup_cfg(path, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    n_aa = sum(isinstance(m, AAConv2d) for m in model.modules())
    if "_AA_" in os.path.basename(path):
        assert n_aa > 0
        assert cfg.MODEL.BACKBONE.NAME == "build_retinanet_aa_resnet_fpn_backbone"
    else:
        assert n_aa == 0
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    # The MSRA ImageNet weights' conventions, stated by every config.
    assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert list(cfg.MODEL.PIXEL_MEAN) == [103.530, 116.280, 123.675] and list(cfg.MODEL.PIXEL_STD) == [1.0] * 3


@pytest.mark.parametrize("name", [n for n in SHIPPED if "_AA_" in n])
def test_aa_twin_differs_from_baseline_only_in_backbone(name):
    aa = _flat(setup_cfg(os.path.join(CONFIG_DIR, name + ".yaml")))
    base = _flat(setup_cfg(os.path.join(CONFIG_DIR, name.replace("_AA_", "_") + ".yaml")))
    assert {k for k in aa if aa[k] != base[k]} == {"MODEL.BACKBONE.NAME", "OUTPUT_DIR"}


def test_schedules_and_depths():
    r50_1x = setup_cfg(os.path.join(CONFIG_DIR, "retinanet_R_50_FPN_1x.yaml"))
    r50_3x = setup_cfg(os.path.join(CONFIG_DIR, "retinanet_R_50_FPN_3x.yaml"))
    r101 = setup_cfg(os.path.join(CONFIG_DIR, "retinanet_AA_R_101_FPN_3x.yaml"))
    assert (r50_1x.SOLVER.MAX_ITER, r50_3x.SOLVER.MAX_ITER, r101.SOLVER.MAX_ITER) == (90000, 270000, 270000)
    assert r50_1x.MODEL.RESNETS.DEPTH == 50 and r101.MODEL.RESNETS.DEPTH == 101
    assert r50_1x.MODEL.WEIGHTS.endswith("MSRA/R-50.pkl") and r101.MODEL.WEIGHTS.endswith("MSRA/R-101.pkl")


def _raw_chain(path):
    """Keys set by a config file and its _BASE_ ancestors (nearest first), without detectron2's defaults."""
    chain = []
    while path:
        with open(path) as f:
            own = _flat(yaml.safe_load(f))
        base = own.pop("_BASE_", None)
        chain.append(own)
        path = _resolve(base, os.path.dirname(path)) if base else None  # a path, or a model-zoo name
    return chain


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_no_key_repeats_a_value_its_bases_set(path):
    own, *ancestors = _raw_chain(path)
    for key, value in own.items():
        inherited = next((a[key] for a in ancestors if key in a), None)
        assert inherited != value, f"{os.path.basename(path)} repeats {key}={value!r} from a _BASE_ file"


def test_every_config_has_its_own_output_dir():
    """Runs of two configs never share checkpoints or metrics.json: one OUTPUT_DIR per trainable config."""
    trainable = [p for p in CONFIGS if not os.path.basename(p).startswith("Base-")]
    dirs = {p: setup_cfg(p).OUTPUT_DIR for p in trainable}
    assert len(set(dirs.values())) == len(trainable), dirs
    for path, out in dirs.items():
        assert os.path.basename(out) in os.path.basename(path), (path, out)


def test_aa_defaults_and_stage_validation():
    cfg = setup_cfg()
    assert list(cfg.MODEL.AA.STAGES) == ["res3", "res4", "res5"]
    assert (cfg.MODEL.AA.NUM_HEADS, cfg.MODEL.AA.KAPPA, cfg.MODEL.AA.UPSILON) == (8, 0.2, 0.1)
    assert cfg.MODEL.AA.RELATIVE and cfg.MODEL.AA.IMPL == "auto"
    with pytest.raises(ValueError, match=r"MODEL\.AA\.STAGES.*res6.*res2"):
        setup_cfg(None, ["MODEL.AA.STAGES", "['res3', 'res6']"])


def test_relative_tables_cover_the_largest_padded_map():
    """Each table has one row per offset of the longest map the config can feed the layer: the largest
    image (MAX_SIZE_TRAIN/TEST) padded by the model to the FPN's size divisibility."""
    from detectron2.structures import ImageList

    cfg = setup_cfg(os.path.join(CONFIG_DIR, "retinanet_AA_R_50_FPN_1x.yaml"), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    longest = max(cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST)
    padded = ImageList.from_tensors([torch.zeros(3, 8, longest)], model.backbone.size_divisibility).tensor
    bottom_up = model.backbone.bottom_up
    for name, stride in (("res3", 8), ("res4", 16), ("res5", 32)):
        for block in getattr(bottom_up, name):
            conv = block.conv2
            side = conv.attention_size(1, padded.shape[-1] // stride)[1]
            assert conv.rel_h.shape[0] == conv.rel_w.shape[0] == 2 * side - 1
    assert bottom_up.res3[0].conv2.attention_downsample == 2  # MODEL.AA.DOWNSAMPLE_STAGES default
    assert torch.is_tensor(bottom_up.res5[0].conv2.rel_h)


@pytest.mark.parametrize("opts, message", [
    (["MODEL.AA.STAGES", "['res2', 'res3']"], r"MODEL\.AA\.STAGES.*res2.*MODEL\.BACKBONE\.FREEZE_AT.*=2 freezes"),
    (["MODEL.AA.DOWNSAMPLE_STAGES", "['res6']"], r"MODEL\.AA\.DOWNSAMPLE_STAGES.*res6.*allowed"),
])
def test_recipe_keys_are_checked_before_the_model_is_built(opts, message):
    from aa_detection.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        setup_cfg(os.path.join(CONFIG_DIR, "retinanet_AA_R_50_FPN_1x.yaml"), opts)


@pytest.mark.slow  # runs the tools in their own processes
def test_a_dumped_run_config_loads_in_detectron2s_own_tools_after_one_import(tmp_path):
    """What detectron2's demo/analyze_model/export tools do (get_cfg, merge_from_file, build_model), in a
    fresh process whose only project line is `import aa_detection`."""
    import subprocess
    import sys

    dumped = tmp_path / "config.yaml"
    dumped.write_text(setup_cfg(os.path.join(CONFIG_DIR, "retinanet_AA_R_50_FPN_1x.yaml"),
                                ["MODEL.AA.ATTENTION_GAIN", "0.25"]).dump())
    script = (
        "import sys\nimport aa_detection\n"
        "from detectron2.config import get_cfg\nfrom detectron2.modeling import build_model\n"
        "cfg = get_cfg()\ncfg.merge_from_file(sys.argv[1])\ncfg.MODEL.DEVICE = 'cpu'\nmodel = build_model(cfg)\n"
        "print(type(model.backbone.bottom_up.res3[0].conv2).__name__, cfg.MODEL.AA.ATTENTION_GAIN)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(dumped)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["AAConv2d", "0.25"]
    from detectron2.config import defaults, get_cfg

    assert get_cfg().MODEL.AA == defaults._C.MODEL.AA  # get_cfg still clones the defaults we extend


def test_detectron2_model_zoo_configs_are_bases_by_path_and_by_name(tmp_path):
    """detectron2's own RetinaNet configs (whose Base-RetinaNet.yaml holds a Python tag) are read, as the
    installed package's files; the same tag in any other file is refused unless that file is trusted."""
    from aa_detection.config import model_zoo_config_dir
    from aa_detection.errors import ConfigError

    zoo_file = os.path.join(model_zoo_config_dir(), "COCO-Detection", "retinanet_R_50_FPN_1x.yaml")
    by_name = tmp_path / "by_name.yaml"
    by_name.write_text('_BASE_: "COCO-Detection/retinanet_R_50_FPN_1x.yaml"\n'
                       'MODEL:\n  BACKBONE:\n    NAME: "build_retinanet_aa_resnet_fpn_backbone"\n')
    by_path = tmp_path / "by_path.yaml"
    by_path.write_text(f'_BASE_: "{zoo_file}"\n')
    for path in (by_name, by_path):
        cfg = setup_cfg(str(path))
        assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0] == pytest.approx([32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)])
    assert setup_cfg("COCO-Detection/retinanet_R_50_FPN_1x.yaml").MODEL.META_ARCHITECTURE == "RetinaNet"
    copied = tmp_path / "copied.yaml"
    with open(os.path.join(model_zoo_config_dir(), "Base-RetinaNet.yaml")) as f:
        copied.write_text(f.read())
    with pytest.raises(ConfigError, match=r"copied\.yaml: refusing an unsafe YAML tag.*--trust-config"):
        setup_cfg(str(copied))
    assert setup_cfg(str(copied), trusted=[str(copied)]).MODEL.META_ARCHITECTURE == "RetinaNet"


CONFIG_TOOLS = ["train_net", "demo", "export_model", "analyze_model", "convert_pretrained_to_d2", "visualize",
                "run_synthetic", "benchmark"]


@pytest.mark.parametrize("tool", CONFIG_TOOLS)
def test_every_tool_reading_configs_takes_trust_config(tool, capsys):
    module = load_tool(tool)
    parser_help = []
    for argv in [["predict", "--help"], ["attention", "--help"]] if tool == "visualize" else [["--help"]]:
        with pytest.raises(SystemExit) as exit_info:
            module.main(argv) if hasattr(module, "main") else module.argument_parser().parse_args(argv)
        assert exit_info.value.code == 0
        parser_help.append(capsys.readouterr().out)
    assert all("--trust-config" in text for text in parser_help), tool


def test_a_trusted_config_with_a_python_tag_is_read_by_a_tool(tmp_path, capsys):
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(
        f'_BASE_: "{os.path.join(CONFIG_DIR, "synthetic", "retinanet_R_18_FPN_synthetic.yaml")}"\nMODEL:\n'
        '  ANCHOR_GENERATOR:\n    SIZES: !!python/object/apply:eval ["[[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] '
        'for x in [12, 24, 48, 96, 192]]"]\n')
    analyze = load_tool("analyze_model")
    with pytest.raises(SystemExit) as exit_info:  # exit_on_user_error: the message, exit status 2
        with exit_on_user_error():
            analyze.main(["--config-file", str(tagged), "--no-flops"])
    assert exit_info.value.code == 2
    assert "tagged.yaml: refusing an unsafe YAML tag" in capsys.readouterr().err
    analyze.main(["--config-file", str(tagged), "--no-flops", "--trust-config", str(tagged)])
    assert "tagged.yaml" in capsys.readouterr().out
