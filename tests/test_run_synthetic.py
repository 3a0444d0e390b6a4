"""tools/run_synthetic.py --seeds: one run per seed in <model>/seed<N>, summarised over seeds; the same
seed gives the same run (losses and AP)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; see README.md, Install")
from aa_detection.engine.runs import train_seeds  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/synthetic/retinanet_R_18_FPN_synthetic.yaml")

pytestmark = pytest.mark.slow


def _opts(tmp_path, data, max_iter=20):
    return ["DATASETS.SYNTHETIC.ROOT", data, "DATASETS.SYNTHETIC.NUM_TRAIN", "32", "DATASETS.SYNTHETIC.NUM_VAL", "6",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(max_iter),
            "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "10",
            "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "1",
            "DATASETS.CHECK_CACHE_DIR", str(tmp_path / "cache")]


def _run(tmp_path, data, output, seeds, config=CONFIG, max_iter=20, trusted=()):
    opts = _opts(tmp_path, data, max_iter)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools/run_synthetic.py"), "--configs", config,
                           *(f"--trust-config={f}" for f in trusted), "--seeds", str(seeds), "--output", output,
                           *opts],
                          capture_output=True, text=True, cwd=ROOT)


def _losses(run):
    with open(os.path.join(run, "metrics.json")) as f:
        return [(r["iteration"], r.get("total_loss"), r.get("bbox/AP")) for r in map(json.loads, f)]


def test_seeds_are_separate_runs_and_a_seed_repeats_exactly(tmp_path, tiny_synthetic):
    data = tiny_synthetic
    first = _run(tmp_path, data, str(tmp_path / "a"), seeds=2)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = {s: str(tmp_path / "a" / "retinanet_R_18_FPN" / f"seed{s}") for s in (1, 2)}
    for seed, run in runs.items():
        with open(os.path.join(run, "config.yaml")) as f:
            assert f"SEED: {seed}\n" in f.read()
    assert "retinanet_R_18_FPN (2 runs)" in first.stdout and " +- " in first.stdout
    assert _losses(runs[1]) != _losses(runs[2])  # another seed, another run
    again = _run(tmp_path, data, str(tmp_path / "b"), seeds=1)
    assert again.returncode == 0, again.stderr[-3000:]
    repeat = str(tmp_path / "b" / "retinanet_R_18_FPN" / "seed1")
    assert _losses(repeat) == _losses(runs[1])  # losses and AP at every logged iteration
    assert any(ap is not None for _, _, ap in _losses(repeat))


def test_a_trusted_config_reaches_every_run(tmp_path, tiny_synthetic):
    """--trust-config is checked by run_synthetic and passed on to each run's train_net.py, which reads the
    config again: without it the runs would refuse the tag."""
    tagged = tmp_path / "tagged_synthetic.yaml"
    tagged.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  ANCHOR_GENERATOR:\n    SIZES: !!python/object/apply:eval '
                      '["[[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in [10, 20, 40, 80, 160]]"]\n')
    refused = _run(tmp_path, tiny_synthetic, str(tmp_path / "a"), seeds=1, config=str(tagged), max_iter=2)
    assert refused.returncode == 2 and "tagged_synthetic.yaml: refusing an unsafe YAML tag" in refused.stderr
    assert not (tmp_path / "a").exists()
    trusted = _run(tmp_path, tiny_synthetic, str(tmp_path / "a"), seeds=1, config=str(tagged), max_iter=2,
                   trusted=[str(tagged)])
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    with open(tmp_path / "a" / "tagged" / "seed1" / "config.yaml") as f:
        assert "- 10\n" in f.read()  # the tag's anchor sizes (the config's own start at 12), evaluated


def test_each_seed_runs_the_named_training_script_once(tmp_path, tiny_synthetic):
    """train_seeds runs the script it is given (tools/ beside the caller, not beside the package, which a
    non-editable install moves) once per config and seed, with the trusted configs, the seed and the run's
    folder; a run that fails is named, the others are returned."""
    script = tmp_path / "record_args.py"
    script.write_text("import json, os, sys\n"
                      "out = sys.argv[sys.argv.index('OUTPUT_DIR') + 1]\n"
                      "os.makedirs(out)\n"
                      "json.dump(sys.argv[1:], open(os.path.join(out, 'argv.json'), 'w'))\n"
                      "sys.exit(3 if out.endswith('seed2') else 0)\n")
    runs, failed = train_seeds(str(script), [CONFIG], [1, 2], str(tmp_path / "out"), _opts(tmp_path, tiny_synthetic),
                               trusted=[CONFIG])
    folders = [str(tmp_path / "out" / "retinanet_R_18_FPN" / f"seed{seed}") for seed in (1, 2)]
    assert runs == folders[:1] and failed == folders[1:]
    for seed, folder in zip((1, 2), folders):
        with open(os.path.join(folder, "argv.json")) as f:
            argv = json.load(f)
        assert argv[:3] == ["--config-file", CONFIG, f"--trust-config={CONFIG}"]
        assert argv[-4:] == ["SEED", str(seed), "OUTPUT_DIR", folder]
