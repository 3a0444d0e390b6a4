"""Comparing runs over seeds: mean, standard deviation, per-seed values and the paired difference."""
import json
import os
import statistics

from aa_detection.engine.compare import format_table, group_runs, load_run, plot_runs


def _fake_run(path, ap_final, losses, seed=None):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.json"), "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"iteration": 20 * i + 19, "total_loss": loss, "time": 0.5}) + "\n")
        f.write(json.dumps({"iteration": 20 * len(losses) - 1, "bbox/AP": ap_final - 5}) + "\n")
        f.write('{"iteration": 99, "total_lo')  # a line cut by an interruption
    res = {"iteration": 20 * len(losses), "params": 2.5e6, "gflops": 1.25, "seconds_per_image": 0.02,
           "train_seconds": 100.0, "results": {"val": {"bbox": {
               "AP": ap_final, "AP50": 60.0, "AP75": 30.0, "APs": 10.0, "APm": 40.0, "APl": float("nan")}}}}
    with open(os.path.join(path, "eval_results.json"), "w") as f:
        json.dump(res, f)
    if seed is not None:
        with open(os.path.join(path, "config.yaml"), "w") as f:
            f.write(f"SEED: {seed}\nOUTPUT_DIR: {path}\n")


def _rows(table):
    """{first cell: the other cells} of a Markdown table's rows."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("|-"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_two_single_runs_side_by_side(tmp_path):
    _fake_run(str(tmp_path / "base"), 30.0, [2.0, 1.5, 1.0])
    _fake_run(str(tmp_path / "aa"), 32.5, [2.0, 1.4, 0.9])
    runs = [load_run(str(tmp_path / "base")), load_run(str(tmp_path / "aa"))]
    rows = _rows(format_table(runs))
    assert rows["AP"] == ["30.0", "32.5", "+2.5"]
    assert rows["APl"] == ["-", "-", "-"]
    assert rows["params (M)"] == ["2.50", "2.50", "+0.00"]
    assert runs[0]["ap"] == [(59, 25.0)] and len(runs[0]["loss"]) == 3
    plot = plot_runs(runs, str(tmp_path / "plots" / "p.png"))
    assert os.path.getsize(plot) > 1000 and os.listdir(tmp_path / "plots") == ["p.png"]  # no temporary file left
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # the format of the name, not of the temporary file's
    with open(plot_runs(runs, str(tmp_path / "plots" / "p.pdf")), "rb") as f:
        assert f.read(4) == b"%PDF"  # also a format that is not matplotlib's default


def test_seeds_are_grouped_and_summarised(tmp_path):
    base_ap, aa_ap = {1: 40.1, 2: 36.8, 3: 40.6}, {1: 41.0, 2: 38.3, 3: 40.2}
    for seed in (1, 2, 3):
        _fake_run(str(tmp_path / "R18" / f"seed{seed}"), base_ap[seed], [2.0, 1.0], seed)
        _fake_run(str(tmp_path / "AA-R18" / f"seed{seed}"), aa_ap[seed], [2.0, 1.0], seed)
    runs = [load_run(str(tmp_path / m / f"seed{s}")) for m in ("R18", "AA-R18") for s in (3, 1, 2)]
    groups = group_runs(runs)
    assert list(groups) == ["R18", "AA-R18"] and [r["seed"] for r in groups["R18"]] == [3, 1, 2]
    table = format_table(runs)
    mean, std = statistics.mean(base_ap.values()), statistics.stdev(base_ap.values())
    diffs = [aa_ap[s] - base_ap[s] for s in (3, 1, 2)]
    cells = ["AP"] + _rows(table)["AP"]
    assert cells[1] == f"{mean:.1f} +- {std:.1f} (40.6 / 40.1 / 36.8)"
    assert cells[3] == (f"{statistics.mean(diffs):+.1f} +- {statistics.stdev(diffs):.1f} "
                        f"({' / '.join(f'{d:+.1f}' for d in diffs)})")
    assert "R18 (3 runs)" in table and "AA-R18 - R18" in table and "R18: 3, 1, 2" in table


def test_unpaired_seeds_give_the_difference_of_means_with_its_standard_error(tmp_path):
    for seed, ap in ((1, 30.0), (2, 32.0)):
        _fake_run(str(tmp_path / "a" / f"seed{seed}"), ap, [1.0], seed)
    for seed, ap in ((5, 33.0), (6, 37.0)):
        _fake_run(str(tmp_path / "b" / f"seed{seed}"), ap, [1.0], seed)
    runs = [load_run(str(tmp_path / m / f"seed{s}")) for m, seeds in (("a", (1, 2)), ("b", (5, 6))) for s in seeds]
    error = (2.0 / 2 + 8.0 / 2) ** 0.5
    assert _rows(format_table(runs))["AP"][2] == f"+4.0 +- {error:.1f} (standard error)"


def test_an_ablation_is_one_row_per_model_compared_with_the_first(tmp_path):
    aps = {"base": {1: 30.0, 2: 32.0, 3: 31.0}, "aa": {1: 29.0, 2: 33.5, 3: 30.0}, "aa_zero": {1: 31.0, 2: 32.0, 3: 34.0}}
    runs = []
    for model, by_seed in aps.items():
        for seed, ap in by_seed.items():
            _fake_run(str(tmp_path / model / f"seed{seed}"), ap, [2.0, 1.0], seed)
            runs.append(load_run(str(tmp_path / model / f"seed{seed}")))
    rows = _rows(format_table(runs))
    header = rows["model"]
    assert header[:3] == ["runs", "AP", "AP - base"] and "train time (s)" in header and "iterations" in header
    for model, by_seed in aps.items():
        cells = dict(zip(header, rows[model]))
        values = list(by_seed.values())
        assert cells["runs"] == "3"
        assert cells["AP"] == (f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f} "
                               f"({' / '.join(f'{v:.1f}' for v in values)})")
        diffs = [by_seed[s] - aps["base"][s] for s in (1, 2, 3)]
        expected = "-" if model == "base" else f"{statistics.mean(diffs):+.1f}"
        assert cells["AP - base"].split(" ")[0] == expected
    assert rows["aa_zero"][header.index("AP - base")].endswith("(+1.0 / +0.0 / +3.0)")
