import math
import os

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
import torch  # noqa: E402

from aa_detection.analysis import count_parameters, flop_count  # noqa: E402
from aa_detection.layers.kernel import kernel_available  # noqa: E402
from aa_detection.config import setup_cfg  # noqa: E402
from aa_detection.layers import AAConv2d  # noqa: E402

from common import ROOT, load_tool  # noqa: E402



@pytest.mark.parametrize("impl", ["naive", "fused", "kernel"])
def test_flop_count_counts_attention_matmuls_by_real_widths(impl):
    if impl == "kernel" and not kernel_available():
        pytest.skip("aa_detection._C is not built")
    B, C, F, H, W, heads, dk, dv = 1, 16, 32, 12, 10, 2, 8, 6
    layer = AAConv2d(C, F, num_heads=heads, key_depth=dk, value_depth=dv, impl=impl).eval()
    total, by_op = flop_count(layer, (torch.randn(B, C, H, W),))
    hw = H * W
    convs = hw * (F - dv) * C * 9 + hw * C * (2 * dk + dv) + hw * dv * dv
    content = B * heads * hw * hw * (dk // heads + dv // heads)  # q.k and p.v
    relative = B * heads * hw * (H + W) * (dk // heads)  # q . r^H and q . r^W
    assert by_op["conv"] == convs
    assert by_op["attention"] == content + relative
    assert total == convs + content + relative


@pytest.mark.slow  # R-50 RetinaNets
def test_analyze_model_prints_params_and_flops(capsys):
    configs = [os.path.join(ROOT, "configs", f) for f in ("retinanet_R_50_FPN_1x.yaml",
                                                          "retinanet_AA_R_50_FPN_1x.yaml")]
    rows = load_tool("analyze_model").main(["--config-file", *configs, "--size", "64", "96",
                                            "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    out = capsys.readouterr().out
    assert "params (M)" in out and "GFLOPs" in out and "params x" in out
    plain, aa = rows
    assert aa["params"] < plain["params"] and aa["attention_gflops"] > 0 and plain["attention_gflops"] == 0
    assert all(math.isfinite(r["gflops"]) and r["gflops"] > 0 for r in rows)


@pytest.mark.slow  # R-50 RetinaNets
def test_aa_r50_retinanet_has_fewer_parameters_than_r50():
    from detectron2.modeling import build_model

    counts = {}
    for name in ("retinanet_R_50_FPN_1x", "retinanet_AA_R_50_FPN_1x"):
        cfg = setup_cfg(os.path.join(ROOT, "configs", name + ".yaml"), ["MODEL.DEVICE", "cpu"])
        counts[name] = count_parameters(build_model(cfg))["total"]
    ratio = counts["retinanet_AA_R_50_FPN_1x"] / counts["retinanet_R_50_FPN_1x"]
    assert ratio <= 1.0 and abs(ratio - 33.1 / 33.4) < 0.01  # the paper's 33.1M vs 33.4M


@pytest.mark.slow  # R-50 RetinaNets
def test_flop_count_of_a_detector_is_the_same_for_every_attention_path():
    from detectron2.modeling import build_model

    cfg = setup_cfg(os.path.join(ROOT, "configs", "retinanet_AA_R_50_FPN_1x.yaml"),
                    ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    model = build_model(cfg).eval()
    inputs = ([{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}],)
    counts = {}
    for impl in ("naive", "fused"):
        for module in model.modules():
            if isinstance(module, AAConv2d):
                module.impl = impl
        counts[impl] = flop_count(model, inputs)
    (naive_total, naive_ops), (fused_total, fused_ops) = counts["naive"], counts["fused"]
    assert naive_total == fused_total and naive_ops == fused_ops
    assert naive_ops["attention"] > 0 and not {"einsum", "matmul", "bmm"} & set(naive_ops)


def test_flop_count_counts_the_kernel_attention():
    from aa_detection.layers.kernel import kernel_available

    if not kernel_available():
        pytest.skip("aa_detection._C is not built")
    B, C, F, H, W, heads, dk, dv = 1, 16, 32, 12, 10, 2, 8, 6
    layer = AAConv2d(C, F, num_heads=heads, key_depth=dk, value_depth=dv, impl="kernel").eval()
    total, by_op = flop_count(layer, (torch.randn(B, C, H, W),))
    hw = H * W
    convs = hw * (F - dv) * C * 9 + hw * C * (2 * dk + dv) + hw * dv * dv
    assert total == convs + B * hw * hw * (dk + dv) + B * hw * (H + W) * dk


def test_trailing_overrides_after_a_list_of_files_are_overrides(tmp_path, monkeypatch):
    """Every tool takes `KEY VALUE` overrides at the end of the command, also right after an option that
    takes several files or inputs."""
    import argparse

    from aa_detection.benchmark import model
    from aa_detection.config import split_overrides
    from aa_detection.visualization import cli

    a, b = (os.path.join(ROOT, "configs", "synthetic", f"retinanet_{m}_FPN_synthetic.yaml")
            for m in ("R_18", "AA_R_18"))
    keys = ["SEED", "3", "MODEL.AA.STAGES", "['res5']"]
    parsed = {
        "run_synthetic": (load_tool("run_synthetic").parse_args(["--configs", a, b, *keys]), "configs", [a, b]),
        "analyze_model": (load_tool("analyze_model").parse_args(["--config-file", a, b, *keys]), "config_file", [a, b]),
        "benchmark": (model.add_arguments(argparse.ArgumentParser()).parse_args(["--config-files", a, b, *keys]),
                      "config_files", [a, b]),
        "demo": (load_tool("demo").parse_args(["--config-file", a, "--input", "x.jpg", "photos/", *keys]),
                 "input", ["x.jpg", "photos/"]),
        "visualize": (cli.parse_args(["compare", "--config-file", a, b, "--weights", "w1", "w2", "--output", "out",
                                      "--input", "x.jpg", "photos/", *keys]), "input", ["x.jpg", "photos/"]),
        "train_net": (load_tool("train_net").argument_parser().parse_args(
            ["--config-file", a, "--dataset", "mine", "mine.json", "images/", *keys]), "dataset",
            [["mine", "mine.json", "images/"]]),
    }
    for tool, (args, files, expected) in parsed.items():
        assert (getattr(args, files), args.opts) == (expected, keys), tool
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SEED").write_text("")  # an existing file named like a key is a file
    assert split_overrides([a, "SEED", "MODEL.X", "1"], ["SOLVER.MAX_ITER", "2"]) == (
        [a, "SEED"], ["MODEL.X", "1", "SOLVER.MAX_ITER", "2"])
