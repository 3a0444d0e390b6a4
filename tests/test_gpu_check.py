"""tools/gpu_check.py: the steps' deadlines and failures, and its dry run (every step on the CPU)."""
import json
import os
import sys
import time

import pytest

from aa_detection.benchmark import gpu_check

from common import ROOT


class Recorded:
    """A `log` that keeps its lines."""

    def __init__(self):
        self.lines = []

    def __call__(self, message):
        self.lines.append(message)


def test_each_step_gets_its_share_plus_what_the_earlier_ones_left():
    allowed = {}

    def step(name, seconds):
        def run(limit):
            allowed[name] = limit
            time.sleep(seconds)
            return "ok", 0
        return run

    # shares 1:1:2 of 4 s: deadlines at 1, 2 and 4 s; the first step leaves its second to the second step
    steps = [("a", 1, step("a", 0)), ("b", 1, step("b", 0.5)), ("c", 2, step("c", 0))]
    gpu_check.run_steps(steps, 4, lambda name, record: None, Recorded())
    assert allowed["a"] == pytest.approx(1, abs=0.15)
    assert allowed["b"] == pytest.approx(2, abs=0.15)
    assert allowed["c"] == pytest.approx(3.5, abs=0.15)


def test_a_failing_or_overrunning_step_is_recorded_and_the_next_ones_still_run(tmp_path):
    log = Recorded()
    ended = []

    def timed_out(limit):
        with open(tmp_path / "out.log", "w") as output:
            return gpu_check.run_command([sys.executable, "-c", "import time; time.sleep(30)"], limit, output)[:2]

    def raises(limit):
        raise RuntimeError("broken")

    steps = [("slow", 1, timed_out), ("broken", 1, raises), ("fine", 1, lambda limit: ("ok", 0))]
    start = time.monotonic()
    records = gpu_check.run_steps(steps, 1.5, lambda name, record: ended.append(name), log)
    assert time.monotonic() - start < 15  # the sleeping process was stopped at its deadline
    assert [records[n]["status"] for n in ("slow", "broken", "fine")] == ["timeout", "failed", "ok"]
    assert ended == ["slow", "broken", "fine"] and any("RuntimeError: broken" in line for line in log.lines)


def test_targets_are_unmeasured_without_results(tmp_path):
    targets = gpu_check.targets(str(tmp_path), gpu_check.GPU_PLAN)
    assert targets and all(t["met"] is None for t in targets)


def test_targets_of_gpu_results(tmp_path):
    """The targets read from results as the GPU check writes them (made up here): flex's time / floor, its
    res3 peak against the dense bf16 logits, the dense-allocation test, the AA / R-50 ratios per batch."""
    from aa_detection.benchmark import report

    def flex(multiple, peak):
        return {"floor_multiple": multiple, "best_floor_multiple": multiple, "peak_bytes": peak, "time": {}}

    dense_fp32 = 2 * 8 * (100 * 167) ** 2 * 4
    rows = [{"size": "res4", "threads": 16, "paths": {"flex": {"forward": flex(2.0, 1), "train": flex(3.5, 1)}}},
            {"size": "res3", "threads": 16, "naive_logits_bytes": dense_fp32,
             "paths": {"flex": {"forward": flex(1.5, 2**30), "train": flex(2.5, dense_fp32)}}}]
    files = {
        "attention_cuda_bf16.json": {"rows": rows},
        "model_res3-res5_cuda_bf16.json": {"aa": {"train_iter_s": {"median": 1.2}, "train_peak_GiB": 2.8},
                                           "baseline": {"train_iter_s": {"median": 1.0}, "train_peak_GiB": 2.0}},
        "tests.json": {f"tests/test_cuda.py::{gpu_check.DENSE_TEST}": {"outcome": "passed"}},
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    met = {t["target"]: t["met"] for t in gpu_check.targets(str(tmp_path), gpu_check.GPU_PLAN)}
    assert met["attention res4 forward (flex) time / floor"] and not met["attention res4 train (flex) time / floor"]
    assert met["attention res3 forward (flex) peak memory below the dense (B, Nh, HW, HW) bf16 logits"]
    assert not met["attention res3 train (flex) peak memory below the dense (B, Nh, HW, HW) bf16 logits"]
    assert met["tests/test_cuda.py: no (HW, HW) allocation in a flex training call at res3"]
    assert met["AA-R-50 / R-50 training step time, batch 2"] and not met["AA-R-50 / R-50 training peak memory, batch 2"]
    assert met["AA-R-50 / R-50 training step time, batch 8"] is None and met["training: the loss stays finite"] is None
    # BENCHMARKS.md's targets: flex on CUDA where the CPU has the kernel
    assert [r[0] for r in report.attention_targets({"rows": rows})][0] == "attention res4 forward (flex) time / floor"


@pytest.mark.slow
def test_the_dry_run_walks_every_step_on_the_cpu(tmp_path):
    """The whole check at tiny sizes (about a minute on 2 cores): every step completes, the results are in
    the files tools/make_benchmarks.py reads, and the training's targets are met."""
    out, work = tmp_path / "out", tmp_path / "work"
    archive = os.path.join(ROOT, ".d2")
    flags = ["--dry-run", "--output", str(out), "--work-dir", str(work)]
    if os.path.isdir(os.path.join(ROOT, ".whl")) and os.path.isdir(archive) and os.listdir(archive):
        flags += ["--wheels", os.path.join(ROOT, ".whl"),
                  "--detectron2-archive", os.path.join(archive, sorted(os.listdir(archive))[0])]
    assert gpu_check.main(flags) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {name: r["status"] for name, r in summary["steps"].items()} == {name: "ok" for name, _ in gpu_check.STEPS}
    assert {"attention_cpu.json", "model_res3-res5_cpu.json", "model_res3-res5_cpu_batch2.json", "tests.json",
            "training.json", "environment.json", "gpu_check.log", "summary.json"} == set(os.listdir(out))
    met = {t["target"]: t["met"] for t in summary["targets"]}
    assert met["training: the loss stays finite"] and met["training: attention/<stage>/alive in metrics.json"]
    assert json.loads((out / "attention_cpu.json").read_text())["flex_compile"]
    assert "## Targets" in (work / "BENCHMARKS.md").read_text()
