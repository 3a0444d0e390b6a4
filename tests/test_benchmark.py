import json
import os
import subprocess
import sys

import pytest
import torch

from aa_detection.benchmark import attention, report
from aa_detection.benchmark.common import compare_times, run_in_turns
from aa_detection.utils.table import format_table
from aa_detection.layers.kernel import kernel_available

from common import ROOT, load_tool  # noqa: E402

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
NEEDS_DETECTRON2 = "detectron2 is not installed (the model benchmark and its rendering need it); see README.md, Install"


def _summary(runs):
    return {"median": sorted(runs)[len(runs) // 2], "min": min(runs), "max": max(runs), "runs": runs,
            "cores_used": 2.0}


def _model_result(aa_inference_runs, profile_other_op_s):
    """A model benchmark's results with the given AA inference runs and the AA model's profiled time of
    one operator other than the attention (the baseline's is 0.10 s)."""
    def model(params, runs, attention_s, other_s):
        return {"params_M": params, "gflops": 250.0, "attention_gflops": 8.0 * (attention_s > 0),
                "inference_s": _summary(runs), "inference_peak_GiB": 0.3,
                "train_iter_s": _summary([10.0, 10.5, 11.0]), "train_peak_GiB": 3.0,
                "profile_ops": {"_KernelAttention": attention_s, "aten::convolution": other_s}}

    base = model(37.9, [2.0, 2.1, 2.2], 0.0, 0.10)
    aa = model(37.5, aa_inference_runs, 0.25, profile_other_op_s)
    return {"environment": {"date": "2026-01-01 00:00 UTC"}, "device": "cpu", "size": [800, 1333],
            "configs": {"baseline": "base.yaml", "aa": "aa.yaml"},
            "baseline": base, "aa": aa, "profile": {"baseline": base.pop("profile_ops"), "aa": aa.pop("profile_ops")}}


def test_floor_matches_a_hand_count():
    # B=1, Nh=2, 2x3 map (HW=6), dkh=4, dvh=5: 1*2*6*6 = 72 (query, key) pairs.
    work = attention.floor_work(1, 2, 2, 3, 4, 5)
    # forward: q.k 2*72*4 = 576, relative 2*2*6*(2+3)*4 = 480 plus 2*72 = 144 adds, p.v 2*72*5 = 720.
    assert work["forward"] == (576 + 480 + 144 + 720, 72)
    # backward: 2*72*(2*4 + 2*5) = 2592, 2*72 = 144 adds, 2*480 = 960 for the relative einsums.
    assert work["train"] == (1920 + 2592 + 144 + 960, 72)
    rates = {"matmul_flops": 1000.0, "exp_rates": {"torch.exp": 10.0, "kernel exp": 72.0}, "exp_per_s": 72.0}
    assert attention.floor_seconds(1920, 72, rates) == pytest.approx(1.92 + 1.0)
    assert attention.floor_seconds(1920, 72, rates, "torch.exp") == pytest.approx(1.92 + 7.2)


@pytest.mark.parametrize("amp, dtype", [(None, torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_inputs_come_in_the_amp_dtype_as_the_qkv_convolution_gives_them(amp, dtype):
    (q, k, v, rel_h, rel_w), grad_out = attention.make_inputs(2, 8, 5, 7, 13, 6, torch.device("cpu"), amp)
    assert {t.dtype for t in (q, k, v, grad_out)} == {dtype}
    assert rel_h.dtype == rel_w.dtype == torch.float32  # parameters stay fp32 under autocast
    reference, _ = attention.make_inputs(2, 8, 5, 7, 13, 6, torch.device("cpu"))
    assert torch.equal(q, reference[0].to(dtype)) and torch.equal(rel_h, reference[3])  # the same draws


def test_paths_run_where_they_can():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    every = attention.PATHS
    assert attention.paths_for(cpu, every, 1, 2) == ["naive", "fused"] + ["kernel"] * kernel_available()
    assert attention.paths_for(cpu, every, 3, 2) == ["fused"] + ["kernel"] * kernel_available()
    assert attention.paths_for(cuda, every, 1, 2) == ["naive", "fused", "flex"]
    assert attention.paths_for(cuda, ["naive", "kernel"], 3, 2) == []


def test_the_timing_loop_times_each_step_in_turns_with_its_peak():
    order = []

    def allocate(name, nbytes):
        def step():
            order.append(name)
            return torch.ones(nbytes // 4).sum().item()
        return step

    runs = run_in_turns({"small": allocate("small", 1 << 20), "large": allocate("large", 64 << 20)}, "cpu",
                        repeats=2, warmup=1)
    assert order == ["small", "large"] * 3  # the warm-up call of each, then two rounds
    assert len(runs["small"].seconds) == 2 and runs["small"].result == (1 << 18)
    assert runs["large"].peak_bytes > 60 << 20 > runs["small"].peak_bytes
    summary = runs["large"].summary()
    assert summary["min"] <= summary["median"] <= summary["max"] and summary["cores_used"] > 0


def test_sentences_follow_the_numbers():
    apart = compare_times("AA", _summary([3.0, 3.1, 3.2]), "baseline", _summary([2.0, 2.1, 2.2]))
    overlap = compare_times("AA", _summary([2.1, 2.2, 2.6]), "baseline", _summary([2.0, 2.1, 2.2]))
    assert "1.48x" in apart and "do not overlap" in apart and "cannot tell" not in apart
    assert "1.05x" in overlap and "cannot tell these two apart" in overlap
    single = compare_times("AA", _summary([3.0]), "baseline", _summary([2.0, 2.1, 2.2]))
    assert "one run of AA, so no spread was measured" in single

    # The other operators differ by +0.01 s against a 0.2 s spread, then by +0.5 s.
    quiet = report.profile_summary(_model_result([2.1, 2.2, 2.3], 0.11))
    loud = report.profile_summary(_model_result([2.1, 2.2, 2.3], 0.60))
    assert "+0.01 s, within the spread" in quiet and "within the noise" in quiet
    assert "+0.50 s, more than the spread" in loud and "within the noise" not in loud


def test_rendering_draws_two_conclusions_from_two_results():
    pytest.importorskip("detectron2", reason=NEEDS_DETECTRON2)
    texts = []
    for aa_runs in ([2.1, 2.2, 2.3], [3.0, 3.1, 3.2]):
        text = report.render({"cpu": {"attention": None, "models": {"res4-res5": _model_result(aa_runs, 0.11)}}})
        texts.append(text)
    same, slower = texts
    assert "AA inference / baseline: 1.05x" in same and "cannot tell these two apart" in same
    assert "AA inference / baseline: 1.48x" in slower and "do not overlap" in slower
    for text, verdict in ((same, ["<= 1.15", "1.048", "met"]), (slower, ["<= 1.15", "1.476", "NOT met"])):
        (target,) = [line for line in text.splitlines() if "res4-res5: AA / baseline inference s/img" in line]
        assert [cell.strip() for cell in target.split("|")[2:-1]] == verdict
    assert "No GPU measurements have been made yet" in same and "--device cuda" in same


def _attention_row(with_naive):
    figures = {"time": _summary([0.1, 0.1, 0.1]), "peak_bytes": 1 << 20, "floor_multiple": 2.0,
               "best_floor_multiple": 2.0}
    paths = {"kernel": {"forward": dict(figures, max_abs_diff_out=1e-6)} if with_naive else {"forward": figures}}
    row = {"size": "res3", "H": 100, "W": 167, "dkh": 3, "dvh": 2, "threads": 2, "auto": "kernel",
           "floor": {"forward": {"seconds": 0.05}}, "paths": paths, "skipped": {}}
    if with_naive:
        row["paths"] = {"naive": {"forward": dict(figures, peak_bytes=1 << 30)}, **paths}
    else:
        row["skipped"]["naive"] = {"estimated_peak_bytes": {"forward": 50 << 30}, "budget_bytes": 8 << 30}
    return row


def test_differences_are_empty_without_an_independent_reference():
    for with_naive in (True, False):
        header, rows = attention.table_rows([_attention_row(with_naive)], "forward")
        diff = header.index("out: max abs diff to naive")
        cells = {row[3]: row[diff] for row in rows}
        assert cells["naive"] == "-"  # the reference itself, or skipped
        assert cells["kernel"] == ("1.0e-06" if with_naive else "-")
    sentences = report.attention_sentences({"rows": [_attention_row(False)]}, "forward")
    assert any("no path has an independent reference" in s for s in sentences)


@pytest.mark.slow
def test_attention_tool_smoke_run(tmp_path, capsys):
    out = tmp_path / "attention.json"
    results = load_tool("benchmark_attention").main(
        ["--sizes", "res5", "--batch", "1", "--repeats", "1", "--no-train", "--paths", "naive,fused",
         "--naive-max-gib", "0", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row == results["rows"][0] and row["reference"] is None and set(row["paths"]) == {"fused"}
    assert "max_abs_diff_out" not in row["paths"]["fused"]["forward"]  # naive did not fit: no reference
    assert row["floor"]["forward"]["seconds"] > 0 and row["paths"]["fused"]["forward"]["time"]["median"] > 0
    assert "naive          | skipped" in capsys.readouterr().out


@pytest.mark.skipif(not kernel_available(), reason="aa_detection._C is not built")
def test_attention_tool_times_each_kernel_isa_against_naive(capsys):
    from aa_detection.layers.kernel import kernel_isas

    results = load_tool("benchmark_attention").main(
        ["--sizes", "res5", "--batch", "1", "--repeats", "1", "--no-train", "--paths", "naive,kernel",
         "--kernel-isas", "all"])
    (row,) = results["rows"]
    assert list(row["paths"]) == ["naive"] + [f"kernel[{isa}]" for isa in kernel_isas()]
    for isa in kernel_isas():
        assert row["paths"][f"kernel[{isa}]"]["forward"]["max_abs_diff_out"] < 1e-4
    with pytest.raises(SystemExit) as stop:
        load_tool("benchmark_attention").main(["--sizes", "res5", "--kernel-isas", "neon"])
    assert stop.value.code == 2 and "--kernel-isas: ['neon'] do not run here" in capsys.readouterr().err


@pytest.mark.slow
def test_model_tool_smoke_run(tmp_path, capsys):
    pytest.importorskip("detectron2", reason=NEEDS_DETECTRON2)
    out = tmp_path / "bench.json"
    load_tool("benchmark").main(["--size", "64", "96", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                             "--json", str(out), "MODEL.RESNETS.DEPTH", "18",
                             "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.AA.STAGES", "['res4','res5']"])
    text = capsys.readouterr().out
    assert "AA/baseline" in text and "Cores used" in text and "res4" in text
    results = json.loads(out.read_text())
    for name in ("baseline", "aa"):
        assert results[name]["inference_s"]["median"] > 0 and results[name]["train_iter_s"]["median"] > 0
        assert results[name]["train_peak_GiB"] > 0 and results[name]["params_M"] > 0
    assert set(results["stages"]) == {"res4", "res5"}


def test_make_benchmarks_renders_kept_results_without_measuring(tmp_path):
    pytest.importorskip("detectron2", reason=NEEDS_DETECTRON2)
    folder = tmp_path / "results"
    folder.mkdir()
    result = json.dumps(_model_result([2.1, 2.2, 2.3], 0.11))
    kept = {f"model_{variant}_cpu.json": result for variant in report.VARIANTS}
    for name, text in kept.items():
        (folder / name).write_text(text)
    out = tmp_path / "B.md"
    load_tool("make_benchmarks").main(["--reuse", "--skip-attention", "--keep-json", str(folder), "--out", str(out)])
    text = out.read_text()
    assert {name: (folder / name).read_text() for name in os.listdir(folder)} == kept  # nothing measured
    for variant in report.VARIANTS:
        assert f"## AA-R50 / R50 RetinaNet, attention in {variant}" in text
    assert "## GPU" in text and "No GPU measurements" in text


@pytest.mark.slow
def test_a_benchmark_runs_in_its_own_process(tmp_path):
    out = tmp_path / "attention.json"
    report.run_isolated("attention", ["--sizes", "res5", "--batch", "1", "--repeats", "1", "--no-train",
                                      "--paths", "fused", "--json", str(out)])
    assert json.loads(out.read_text())["rows"][0]["paths"]["fused"]["forward"]["time"]["median"] > 0


# Python code that makes importing detectron2 fail in a fresh process, as on a machine without it.
WITHOUT_DETECTRON2 = "import sys\nsys.modules['detectron2'] = None\n"


@pytest.mark.slow
def test_the_attention_benchmark_runs_without_detectron2(tmp_path):
    """As on a GPU machine without detectron2: make_benchmarks' attention job needs only torch, its model
    job names the missing package."""
    out = tmp_path / "attention.json"
    flags = ["--sizes", "res5", "--batch", "1", "--repeats", "1", "--no-train", "--paths", "fused", "--json", str(out)]
    code = WITHOUT_DETECTRON2 + f"""
from aa_detection.benchmark import report
report._run_benchmark("attention", {flags!r})
try:
    report._run_benchmark("model", ["--help"])
except ModuleNotFoundError as e:
    print("model:", e)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["rows"][0]["paths"]["fused"]["forward"]["time"]["median"] > 0
    assert "model: No module named 'detectron2" in result.stdout


def test_make_benchmarks_checks_the_targets():
    models = {"res4-res5": {"baseline": {"inference_s": {"median": 2.0}, "train_iter_s": {"median": 10.0},
                                         "train_peak_GiB": 3.0, "params_M": 37.9},
                            "aa": {"inference_s": {"median": 2.2}, "train_iter_s": {"median": 14.0},
                                   "train_peak_GiB": 3.0, "params_M": 37.5}}}
    rows = {r[0]: r for r in report.model_targets(models)}
    assert rows["res4-res5: AA / baseline inference s/img"][2:] == ("1.100", "met")
    assert rows["res4-res5: AA / baseline train s/iter"][2:] == ("1.400", "NOT met")
    assert rows["res4-res5: params AA <= baseline"][3] == "met"


def test_one_table_format():
    assert format_table(("a", "bb"), [(1, 2.5)]) == "| a | bb  |\n|---|-----|\n| 1 | 2.5 |"


@NO_CUDA
@pytest.mark.parametrize("tool", ["benchmark_attention", "benchmark", "make_benchmarks"])
def test_cuda_without_a_gpu_is_a_clear_error(tool, tmp_path, capsys):
    if tool == "benchmark":
        pytest.importorskip("detectron2", reason=NEEDS_DETECTRON2)
    argv = ["--device", "cuda"] + (["--out", str(tmp_path / "B.md")] if tool == "make_benchmarks" else [])
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main(argv)
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()
