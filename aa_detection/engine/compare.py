"""Side-by-side comparison of training runs from their output folders, over seeds.

A run folder is a detectron2 OUTPUT_DIR: `metrics.json` (one JSON record per logged iteration, with
`total_loss` and, at evaluations, `bbox/AP` ...), `config.yaml` (its SEED) and, when written by this
project's trainer, `eval_results.json` (final COCO metrics, parameters, GFLOPs, inference and training
time). Runs of one model with different seeds live in `<model>/seed<N>` folders (tools/run_synthetic.py
--seeds writes them): they are grouped under the model's name and reported as mean, standard deviation
and per-seed values.
"""
import json
import math
import os
import re
import statistics
from typing import Dict, List, Optional, Sequence

from ..safe_io import atomic_write, load_yaml_data
from ..utils.table import format_table as markdown_table

__all__ = ["load_run", "group_runs", "format_table", "format_ablation", "plot_runs", "METRIC_KEYS"]

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RESULTS_FILE = "eval_results.json"


def read_metrics(path: str) -> List[dict]:
    """Records of a metrics.json; for an iteration logged twice (a resumed run) the last wins."""
    by_iter = {}
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupted run
                continue
            if "iteration" in rec:
                by_iter.setdefault(rec["iteration"], {}).update(rec)
    return [by_iter[k] for k in sorted(by_iter)]


def load_run(run_dir: str, name: Optional[str] = None) -> dict:
    """A dict describing one run: name, final bbox (and segm, for masks) metrics, complexity, timings, curves."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"not a run folder: {run_dir}")
    records = read_metrics(os.path.join(run_dir, "metrics.json"))
    folder = os.path.normpath(run_dir)
    seed_folder = re.fullmatch(r"seed(-?\d+)", os.path.basename(folder))
    model = os.path.basename(os.path.dirname(folder) if seed_folder else folder)
    run = {"name": name or model, "dir": run_dir, "seed": _seed(run_dir),
           "bbox": {}, "segm": {}, "params": None, "gflops": None, "seconds_per_image": None,
           "train_seconds": None, "iteration": None}
    res_path = os.path.join(run_dir, RESULTS_FILE)
    if os.path.isfile(res_path):
        with open(res_path) as f:
            res = json.load(f)
        for key in ("params", "gflops", "seconds_per_image", "train_seconds", "iteration"):
            run[key] = res.get(key)
        for dataset_results in res.get("results", {}).values():
            if "bbox" in dataset_results:
                run["bbox"] = dataset_results["bbox"]  # the first test dataset with box metrics
                run["segm"] = dataset_results.get("segm", {})
                break
    evals = [r for r in records if "bbox/AP" in r]
    if not run["bbox"] and evals:  # a plain detectron2 folder: take the last evaluation logged
        for task in ("bbox", "segm"):
            if f"{task}/AP" in evals[-1]:
                run[task] = {k: evals[-1].get(f"{task}/{k}") for k in METRIC_KEYS}
    if run["train_seconds"] is None:
        times = [r["time"] for r in records if "time" in r]
        if times:  # detectron2 logs a smoothed time per iteration every 20 iterations
            run["train_seconds"] = sum(times) / len(times) * (records[-1]["iteration"] + 1)
    run["loss"] = [(r["iteration"], r["total_loss"]) for r in records if "total_loss" in r]
    run["ap"] = [(r["iteration"], r["bbox/AP"]) for r in evals]
    return run


def _seed(run_dir):
    """The SEED (a LazyConfig's train.seed) of the run's config.yaml (detectron2 writes it at setup), or None."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    cfg = load_yaml_data(path) or {}
    seed = cfg.get("SEED", (cfg.get("train") or {}).get("seed"))
    return None if seed is None or seed < 0 else seed


def group_runs(runs: Sequence[dict]) -> Dict[str, List[dict]]:
    """{name: [runs]} in order of first appearance: the seeds of one model under its name."""
    groups = {}
    for run in runs:
        groups.setdefault(run["name"], []).append(run)
    return groups


def _fmt(value, spec):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


MASK_ROWS = [(f"mask {k}", lambda r, k=k: r["segm"].get(k), ".1f") for k in METRIC_KEYS[:3]]
ROWS = [(k, lambda r, k=k: r["bbox"].get(k), ".1f") for k in METRIC_KEYS] + [
    ("params (M)", lambda r: None if r["params"] is None else r["params"] / 1e6, ".2f"),
    ("GFLOPs", lambda r: r["gflops"], ".2f"),
    ("s / image", lambda r: r["seconds_per_image"], ".3f"),
    ("train time (s)", lambda r: r["train_seconds"], ".0f"),
    ("iterations", lambda r: r["iteration"], ".0f"),
]


def _known(value):
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _summary(values, spec):
    """One value as it is; several as "mean +- std (v1 / v2 / ...)"."""
    known = [v for v in values if _known(v)]
    if len(known) <= 1:
        return _fmt(known[0] if known else None, spec)
    return (f"{_fmt(statistics.mean(known), spec)} +- {_fmt(statistics.stdev(known), spec.lstrip('+'))} "
            f"({' / '.join(_fmt(v, spec) for v in values)})")


def _difference(reference, other, spec):
    """other - reference: per seed where both have the same seeds (mean +- std of the paired
    differences), otherwise the difference of the means +- its standard error."""
    a, b = ([run for run in g if _known(run[1])] for g in (reference, other))
    if not a or not b:
        return "-"
    seeds_a, seeds_b = [s for s, _ in a], [s for s, _ in b]
    if len(a) > 1 and None not in seeds_a and sorted(seeds_a) == sorted(seeds_b):
        by_seed = dict(b)
        return _summary([by_seed[s] - v for s, v in a], "+" + spec)
    va, vb = [v for _, v in a], [v for _, v in b]
    diff = _fmt(statistics.mean(vb) - statistics.mean(va), "+" + spec)
    if len(va) > 1 and len(vb) > 1:
        error = math.sqrt(statistics.variance(va) / len(va) + statistics.variance(vb) / len(vb))
        return f"{diff} +- {_fmt(error, spec)} (standard error)"
    return diff


def _seeds_line(groups: Dict[str, List[dict]]) -> str:
    return "seeds: " + "; ".join(f"{n}: {', '.join(str(r['seed']) for r in runs)}" for n, runs in groups.items())


def format_table(runs: Sequence[dict]) -> str:
    """A Markdown table of the runs, each model's seeds summarised (mean +- std and per-seed values).

    One or two models: one column per model, with two a column of the second minus the first; mask AP,
    AP50 and AP75 follow the box metrics when a run has them. More (an ablation): `format_ablation`'s
    one row per model."""
    groups = group_runs(runs)
    names = list(groups)
    if len(names) > 2:
        return format_ablation(runs)
    header = ["metric"] + [f"{n} ({len(groups[n])} run{'s' if len(groups[n]) > 1 else ''})" for n in names]
    two = len(names) == 2
    if two:
        header.append(f"{names[1]} - {names[0]}")
    rows = []
    masks = MASK_ROWS if any(r["segm"] for r in runs) else []
    for label, get, spec in ROWS[:len(METRIC_KEYS)] + masks + ROWS[len(METRIC_KEYS):]:
        cells = [label] + [_summary([get(r) for r in groups[n]], spec) for n in names]
        if two:
            paired = [[(r["seed"], get(r)) for r in groups[n]] for n in names]
            cells.append("-" if label == "iterations" else _difference(*paired, spec))
        rows.append(cells)
    return markdown_table(header, rows) + "\n\n" + _seeds_line(groups)


ABLATION_COLUMNS = ("AP", "AP50", "params (M)", "GFLOPs", "train time (s)", "iterations")


def format_ablation(runs: Sequence[dict]) -> str:
    """A Markdown table with one row per model: AP, AP50, parameters, GFLOPs, training time and iterations
    (mean +- std and per-seed values: a run still in progress shows its iterations), AP and AP50 also as
    the difference to the first model (paired by seed when the seeds match)."""
    groups = group_runs(runs)
    names = list(groups)
    getters = {label: (get, spec) for label, get, spec in ROWS}
    header = ["model", "runs"]
    for label in ABLATION_COLUMNS:
        header += [label] + ([f"{label} - {names[0]}"] if label in METRIC_KEYS else [])
    rows = []
    for name in names:
        cells = [name, str(len(groups[name]))]
        for label in ABLATION_COLUMNS:
            get, spec = getters[label]
            cells.append(_summary([get(r) for r in groups[name]], spec))
            if label in METRIC_KEYS:
                paired = [[(r["seed"], get(r)) for r in groups[n]] for n in (names[0], name)]
                cells.append("-" if name == names[0] else _difference(*paired, spec))
        rows.append(cells)
    return markdown_table(header, rows) + "\n\n" + _seeds_line(groups)


def plot_runs(runs: Sequence[dict], path: str) -> str:
    """Write a two-panel plot: total_loss and COCO AP against the iteration, one line per run, one color
    per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for color, (name, group) in enumerate(group_runs(runs).items()):
        for i, run in enumerate(group):  # one color per model, one line per seed
            label = name if i == 0 else None
            if run["loss"]:
                it, loss = zip(*run["loss"])
                ax_loss.plot(it, loss, color=f"C{color}", alpha=0.8, label=label)
            if run["ap"]:
                it, ap = zip(*run["ap"])
                ax_ap.plot(it, ap, color=f"C{color}", marker="o", label=label)
    ax_loss.set(xlabel="iteration", ylabel="total_loss", title="training loss")
    ax_ap.set(xlabel="iteration", ylabel="COCO box AP", title="validation AP")
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:  # the format the name says, PNG without an extension
        fig.savefig(f, dpi=100, format=os.path.splitext(path)[1][1:].lower() or "png")
    plt.close(fig)
    return path
