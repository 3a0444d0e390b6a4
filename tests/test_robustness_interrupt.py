"""Interrupted and diverging trainings: SIGKILL at random moments (one during a checkpoint write), then
--resume to the end; a non-finite loss stops with the iteration and loss terms, keeping the last good
checkpoint."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from aa_detection.checkpoint import AACheckpointer  # noqa: E402
from aa_detection.engine.resilience import repair_metrics_file  # noqa: E402
from aa_detection.engine.trainer import RESULTS_FILE, argument_parser, main  # noqa: E402

pytestmark = pytest.mark.slow  # trainings killed and resumed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs/synthetic/retinanet_R_18_FPN_synthetic.yaml")
MAX_ITER = 8


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from aa_detection.data import ensure_synthetic_dataset

    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    ensure_synthetic_dataset(root, num_train=8, num_val=2, image_size=(48, 64))
    return root


def _opts(data_root, out, *extra):
    return [
        "DATASETS.SYNTHETIC.ROOT", data_root, "DATASETS.SYNTHETIC.NUM_TRAIN", "8", "DATASETS.SYNTHETIC.NUM_VAL", "2",
        "INPUT.MIN_SIZE_TRAIN", "(48,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "48",
        "INPUT.MAX_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01",
        "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RETINANET.NUM_CONVS", "1", "SEED", "1", "OUTPUT_DIR", str(out), *extra]


def _start(data_root, out, resume):
    cmd = [sys.executable, os.path.join(ROOT, "tools/train_net.py"), "--config-file", CFG]
    cmd += ["--resume"] if resume else []
    log = os.path.join(out, f"stdout_{time.monotonic_ns()}.txt")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + _opts(data_root, out), stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore"))
    proc.args_log = log
    return proc


def _kill_when(proc, condition, timeout=300):
    """SIGKILL `proc` as soon as condition() holds (polled every 2 ms); False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("run neither reached the kill point nor ended")


def _checkpoints(out):
    return sorted(f for f in os.listdir(out) if f.startswith("model_") and f.endswith(".pth"))


def _temp_checkpoints(out):
    return [f for f in os.listdir(out) if f.startswith(".model_") and f.endswith(".tmp")]


def _assert_consistent(out):
    """last_checkpoint names a complete checkpoint; every finished checkpoint loads weights-only."""
    tag = os.path.join(out, "last_checkpoint")
    iteration = -1
    if os.path.exists(tag):
        name = open(tag).read()
        assert name in _checkpoints(out), name
        data = torch.load(os.path.join(out, name), weights_only=True)
        assert {"model", "trainer", "iteration"} <= set(data)  # trainer: optimizer, scheduler, hooks
        iteration = data["iteration"]
    for name in _checkpoints(out):
        torch.load(os.path.join(out, name), weights_only=True)
    return iteration


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]  # every line parses


def test_sigkill_at_random_points_then_resume_finishes_like_an_uninterrupted_run(tiny_data, tmp_path):
    rng = random.Random(7)
    out = tmp_path / "killed"
    out.mkdir()
    seen = []

    # 1. a fresh run killed at a random moment after its first checkpoint
    proc = _start(tiny_data, out, resume=False)
    first = []
    delay = rng.uniform(0.0, 1.0)

    def after_first_checkpoint():
        if not first and _checkpoints(out):
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] >= delay

    assert _kill_when(proc, after_first_checkpoint)
    seen.append(_assert_consistent(out))

    # 2. resumed, killed while a checkpoint is being written (its temporary file exists)
    before = set(_checkpoints(out))
    proc = _start(tiny_data, out, resume=True)
    assert _kill_when(proc, lambda: bool(_temp_checkpoints(out))), "no checkpoint write was caught"
    seen.append(_assert_consistent(out))
    assert set(_checkpoints(out)) >= before

    # 3. resumed, killed at a random moment of its training (an iteration or a save)
    proc = _start(tiny_data, out, resume=True)
    started, delay = [], rng.uniform(0.0, 1.5)

    def training_for_a_while():
        if not started and "Starting training from iteration" in open(proc.args_log).read():
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] >= delay

    if _kill_when(proc, training_for_a_while):
        seen.append(_assert_consistent(out))

    # the state a kill during a metrics write leaves: a torn last line (and records of iterations
    # after the last checkpoint, which the resumed run computes again)
    resume_from = _assert_consistent(out) + 1
    with open(out / "metrics.json", "a") as f:
        f.write(json.dumps({"iteration": resume_from, "total_loss": 123.0}) + "\n")
        f.write('{"iteration": 99, "total_lo')

    # 4. resumed to the end
    proc = _start(tiny_data, out, resume=True)
    assert proc.wait(timeout=600) == 0
    assert seen == sorted(seen), seen  # checkpoints only move forward
    assert not _temp_checkpoints(out)  # the partial file of the killed save was removed
    assert open(out / "last_checkpoint").read() == "model_final.pth"
    final = torch.load(out / "model_final.pth", weights_only=True)
    records = _metrics(out)
    assert all(r.get("total_loss") != 123.0 for r in records)
    iterations = [r["iteration"] for r in records if "total_loss" in r]
    assert iterations == sorted(set(iterations)) and iterations[-1] == MAX_ITER - 1
    with open(out / RESULTS_FILE) as f:
        killed_results = json.load(f)

    # an uninterrupted run of the same config ends at the same iteration
    ref = tmp_path / "uninterrupted"
    main(argument_parser().parse_args(["--config-file", CFG, *_opts(tiny_data, ref)]))
    with open(ref / RESULTS_FILE) as f:
        ref_results = json.load(f)
    ref_final = torch.load(ref / "model_final.pth", weights_only=True)
    assert killed_results["iteration"] == ref_results["iteration"] == MAX_ITER
    assert final["iteration"] == ref_final["iteration"] == MAX_ITER - 1
    assert [r["iteration"] for r in _metrics(ref) if "total_loss" in r][-1] == iterations[-1]


def test_non_finite_loss_stops_naming_iteration_and_losses_keeping_last_good_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "nan"
    args = argument_parser().parse_args(["--config-file", CFG, *_opts(
        tiny_data, out, "SOLVER.BASE_LR", "1e20", "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
        "SOLVER.CHECKPOINT_PERIOD", "1")])
    with pytest.raises(FloatingPointError) as info:
        main(args)
    msg = str(info.value)
    stopped = int(msg.split("at iteration=")[1].split("!")[0])
    assert "loss_cls" in msg and "loss_box_reg" in msg and "last good checkpoint" in msg
    last = open(out / "last_checkpoint").read()
    assert last == f"model_{stopped - 1:07d}.pth" and last in msg
    data = torch.load(out / last, weights_only=True)
    assert data["iteration"] == stopped - 1
    assert all(torch.isfinite(v).all() for v in data["model"].values() if v.is_floating_point())
    assert _checkpoints(out)[-1] == last and not (out / "model_final.pth").exists()


def test_a_model_that_is_not_finite_is_not_saved(tmp_path):
    model = nn.Linear(2, 2)
    ckpt = AACheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    ckpt.save("model_0000002", iteration=2)
    assert _checkpoints(tmp_path) == ["model_0000001.pth"]
    assert open(tmp_path / "last_checkpoint").read() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no temporary files


def test_partial_files_of_a_killed_save_are_removed(tmp_path):
    ckpt = AACheckpointer(nn.Linear(2, 2), str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    (tmp_path / ".model_0000003.pth.abc123.tmp").write_bytes(b"\x80\x02partial")
    assert ckpt.get_checkpoint_file().endswith("model_0000001.pth")
    assert len(ckpt.remove_partial_files()) == 1
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_repair_metrics_drops_torn_and_superseded_records(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 3, "a": 1}\n{"iteration": 7, "a": 2}\n{"iteration": 9, "a": 3}\n{"itera')
    assert repair_metrics_file(str(path)) == (3, 1)
    assert repair_metrics_file(str(path), keep_before=8) == (2, 1)
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [3, 7]
    assert repair_metrics_file(str(tmp_path / "none.json")) == (0, 0)
