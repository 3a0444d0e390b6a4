"""Config errors are caught in setup_cfg, before any model is built, with the file or override named."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")

from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.errors import ConfigError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AA_CFG = os.path.join(ROOT, "configs/synthetic/retinanet_AA_R_18_FPN_synthetic.yaml")
NO_DATA = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]


def _yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(config_file, opts=()):
    with pytest.raises(ConfigError) as info:
        setup_cfg(config_file, list(opts) + NO_DATA)
    return str(info.value)


def test_unknown_key_in_file_names_the_file_and_the_allowed_keys(tmp_path):
    path = _yaml(tmp_path, f'_BASE_: "{AA_CFG}"\nMODEL:\n  AA:\n    NUM_HEAD: 4\n')
    msg = _error(path)
    assert path in msg and "MODEL.AA.NUM_HEAD" in msg and "did you mean MODEL.AA.NUM_HEADS" in msg
    assert "'KAPPA'" in msg and "'UPSILON'" in msg


def test_unknown_key_in_a_base_file_names_that_file(tmp_path):
    base = _yaml(tmp_path, f'_BASE_: "{AA_CFG}"\nSOLVER:\n  MAX_ITERS: 5\n', "base.yaml")
    child = _yaml(tmp_path, '_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 5\n', "child.yaml")
    msg = _error(child)
    assert base in msg and child not in msg and "SOLVER.MAX_ITERS" in msg and "did you mean SOLVER.MAX_ITER" in msg


def test_unknown_key_on_the_command_line():
    msg = _error(AA_CFG, ["MODEL.AA.NUM_HEADZ", "4"])
    assert msg.startswith("command-line override") and "MODEL.AA.NUM_HEADZ" in msg and "NUM_HEADS" in msg
    msg = _error(None, ["MODEL.NOPE.X", "1"])
    assert "MODEL.NOPE.X" in msg


def test_wrong_type_in_file_and_on_the_command_line(tmp_path):
    path = _yaml(tmp_path, f'_BASE_: "{AA_CFG}"\nSOLVER:\n  MAX_ITER: "many"\n')
    msg = _error(path)
    assert path in msg and "SOLVER.MAX_ITER must be of type int" in msg and "many" in msg
    msg = _error(AA_CFG, ["SOLVER.BASE_LR", "fast"])
    assert msg.startswith("command-line override") and "SOLVER.BASE_LR must be of type float" in msg
    msg = _error(AA_CFG, ["MODEL.AA.STAGES", "res3"])  # a string where a list is expected
    assert "MODEL.AA.STAGES must be of type list" in msg


@pytest.mark.parametrize("opts, expected", [
    (["MODEL.AA.NUM_HEADS", "128"],
     ["MODEL.AA.NUM_HEADS=128", "stage res3", "out_channels=128", "command-line override"]),
    (["MODEL.AA.UPSILON", "1.0"], ["MODEL.AA.UPSILON=1.0", "stage res3", "value_depth"]),
    (["MODEL.AA.NUM_HEADS", "0"], ["MODEL.AA.NUM_HEADS=0", "num_heads must be >= 1"]),
    (["MODEL.AA.IMPL", "fast"], ["MODEL.AA.IMPL='fast'", "'auto', 'naive', 'fused'"]),
    (["MODEL.AA.STAGES", "['res3', 'res6']"], ["MODEL.AA.STAGES", "res6", "'res2', 'res3', 'res4', 'res5'"]),
    (["DATASETS.BAD_IMAGES", "ignore"], ["DATASETS.BAD_IMAGES='ignore'", "'error', 'skip'"]),
    (["DATASETS.CHECK_IMAGES", "all"], ["DATASETS.CHECK_IMAGES='all'", "'header', 'decode'"]),
    (["SOLVER.OPTIMIZER", "adam"], ["SOLVER.OPTIMIZER='adam'", "'SGD', 'ADAMW'"]),
    (["MODEL.BACKBONE.NAME", "build_resnet_fpn"], ["MODEL.BACKBONE.NAME='build_resnet_fpn'",
                                                   "'build_retinanet_aa_resnet_fpn_backbone'"]),
    (["DATASETS.REGISTER", "[['only_a_name']]"], ["DATASETS.REGISTER entries are [name, json_file, image_root]"]),
    (["MODEL.RESNETS.NUM_GROUPS", "2"],
     ["command-line override", "NUM_GROUPS=1", "MODEL.RESNETS.NUM_GROUPS from command-line override"]),
    (["MODEL.RESNETS.DEPTH", "42"], ["command-line override", "MODEL.RESNETS.DEPTH=42", "18, 34, 50, 101, 152"]),
])
def test_invalid_values_name_the_key_and_the_allowed_values(opts, expected):
    msg = _error(AA_CFG, opts)
    for part in expected:
        assert part in msg, (part, msg)


def test_aa_settings_checked_only_for_stages_that_are_augmented():
    # 128 heads cannot build res3 (128 channels) but can build res4 and res5 (256, 512)
    cfg = setup_cfg(AA_CFG, ["MODEL.AA.NUM_HEADS", "128", "MODEL.AA.STAGES", "['res4', 'res5']"] + NO_DATA)
    assert cfg.MODEL.AA.NUM_HEADS == 128
    # the plain ResNet does not build AA layers at all
    base = AA_CFG.replace("_AA_", "_")
    assert setup_cfg(base, ["MODEL.AA.NUM_HEADS", "128"] + NO_DATA).MODEL.AA.NUM_HEADS == 128


def test_missing_config_and_missing_base(tmp_path):
    missing = str(tmp_path / "nowhere.yaml")
    assert missing in _error(missing)
    child = _yaml(tmp_path, '_BASE_: "gone.yaml"\n')
    msg = _error(child)
    assert str(tmp_path / "gone.yaml") in msg and f"the _BASE_ of {child}" in msg


def test_unsafe_yaml_tag_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = _yaml(tmp_path, f'MODEL: !!python/object/apply:os.system ["touch {marker}"]\n')
    msg = _error(path)
    assert path in msg and "unsafe YAML tag" in msg and "safe loading" in msg
    assert not marker.exists()
    # also when the tag sits in a _BASE_ file
    child = _yaml(tmp_path, f'_BASE_: "{path}"\n', "child.yaml")
    assert path in _error(child) and not marker.exists()


def test_invalid_yaml_names_the_file(tmp_path):
    path = _yaml(tmp_path, "MODEL: [unclosed\n")
    msg = _error(path)
    assert path in msg and "not valid YAML" in msg


@pytest.mark.slow  # runs the tools in their own processes
def test_train_net_prints_the_message_and_exits_nonzero_before_training(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", AA_CFG,
         "MODEL.AA.NUM_HEADS", "128", "OUTPUT_DIR", str(out)] + NO_DATA,
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2
    assert "ERROR (ConfigError): MODEL.AA.NUM_HEADS=128" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing was built or written


@pytest.mark.parametrize("tool, args, expected", [
    ("visualize.py", ["results", "--results", "r.json", "--output", "{tmp}"],
     "ERROR (UsageError): results: --dataset NAME is required"),
    ("compare_runs.py", ["{tmp}/nowhere"], "ERROR (UsageError): not a run folder: {tmp}/nowhere"),
    ("analyze_model.py", ["--config-file", AA_CFG, "--no-flops", "MODEL.AA.NUM_HEADZ", "4"],
     "ERROR (ConfigError): command-line override: unknown config key MODEL.AA.NUM_HEADZ"),
])
@pytest.mark.slow  # runs the tools in their own processes
def test_tools_print_a_user_error_once_and_exit_2(tmp_path, tool, args, expected):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool)]
                          + [a.format(tmp=tmp_path) for a in args],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected.format(tmp=tmp_path) in proc.stderr and proc.stderr.count("ERROR") == 1
    assert "Traceback" not in proc.stderr


def test_a_run_never_starts_in_another_configs_output_dir(tmp_path):
    from aa_detection.engine.trainer import check_output_dir

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic")
    out = ["OUTPUT_DIR", str(tmp_path)]
    baseline = setup_cfg(os.path.join(root, "retinanet_R_18_FPN_synthetic.yaml"), out)
    (tmp_path / "config.yaml").write_text(baseline.dump())  # what a started run leaves
    check_output_dir(setup_cfg(os.path.join(root, "retinanet_R_18_FPN_synthetic.yaml"),
                               out + ["MODEL.WEIGHTS", "model_final.pth"]))  # the same config: evaluate, resume
    with pytest.raises(ConfigError, match=r"holds the run of another config \(MODEL\.BACKBONE\.NAME differ"):
        check_output_dir(setup_cfg(os.path.join(root, "retinanet_AA_R_18_FPN_synthetic.yaml"), out))


def test_the_evaluator_follows_the_datasets_evaluator_type():
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    from aa_detection.engine.trainer import Trainer

    cfg = setup_cfg(AA_CFG)
    MetadataCatalog.get("voc_like_test").set(evaluator_type="pascal_voc", dirname="/nonexistent/VOC2007",
                                             year=2007, split="test", thing_classes=["a", "b"])
    assert isinstance(Trainer.build_evaluator(cfg, "voc_like_test"), PascalVOCDetectionEvaluator)
    MetadataCatalog.get("odd_type_test").set(evaluator_type="cityscapes_instance")
    with pytest.raises(ConfigError, match=r"'odd_type_test' has evaluator_type 'cityscapes_instance'.*'coco'"):
        Trainer.build_evaluator(cfg, "odd_type_test")
