"""Side-by-side comparison of training runs from their output folders.

A run folder is a detectron2 OUTPUT_DIR: `metrics.json` (one JSON record per logged iteration, with
`total_loss` and, at evaluations, `bbox/AP` ...) and, when written by this project's trainer,
`eval_results.json` (final COCO metrics, parameters, GFLOPs, inference and training time).
"""
import json
import math
import os

__all__ = ["load_run", "format_table", "plot_runs", "METRIC_KEYS"]

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RESULTS_FILE = "eval_results.json"


def read_metrics(path):
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


def load_run(run_dir, name=None):
    """A dict describing one run: name, final bbox metrics, complexity, timings, curves."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"not a run folder: {run_dir}")
    records = read_metrics(os.path.join(run_dir, "metrics.json"))
    run = {"name": name or os.path.basename(os.path.normpath(run_dir)), "dir": run_dir,
           "bbox": {}, "params": None, "gflops": None, "seconds_per_image": None,
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
                break
    evals = [r for r in records if "bbox/AP" in r]
    if not run["bbox"] and evals:  # a plain detectron2 folder: take the last evaluation logged
        run["bbox"] = {k: evals[-1].get(f"bbox/{k}") for k in METRIC_KEYS}
    if run["train_seconds"] is None:
        times = [r["time"] for r in records if "time" in r]
        if times:  # detectron2 logs a smoothed time per iteration every 20 iterations
            run["train_seconds"] = sum(times) / len(times) * (records[-1]["iteration"] + 1)
    run["loss"] = [(r["iteration"], r["total_loss"]) for r in records if "total_loss" in r]
    run["ap"] = [(r["iteration"], r["bbox/AP"]) for r in evals]
    return run


def _fmt(value, spec):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_table(runs):
    """A Markdown table, one column per run, with a difference column when there are two runs."""
    rows = [(k, lambda r, k=k: r["bbox"].get(k), ".1f") for k in METRIC_KEYS]
    rows += [
        ("params (M)", lambda r: None if r["params"] is None else r["params"] / 1e6, ".2f"),
        ("GFLOPs", lambda r: r["gflops"], ".2f"),
        ("s / image", lambda r: r["seconds_per_image"], ".3f"),
        ("train time (s)", lambda r: r["train_seconds"], ".0f"),
        ("iterations", lambda r: r["iteration"], "d"),
    ]
    header = ["metric"] + [r["name"] for r in runs]
    two = len(runs) == 2
    if two:
        header.append("difference")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, get, spec in rows:
        values = [get(r) for r in runs]
        cells = [label] + [_fmt(v, spec) for v in values]
        if two:
            a, b = values
            diff = None if a is None or b is None or label == "iterations" else b - a
            cells.append(_fmt(diff, "+" + spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(runs, path):
    """Write a two-panel plot: total_loss and COCO AP against the iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        if run["loss"]:
            it, loss = zip(*run["loss"])
            ax_loss.plot(it, loss, label=run["name"])
        if run["ap"]:
            it, ap = zip(*run["ap"])
            ax_ap.plot(it, ap, marker="o", label=run["name"])
    ax_loss.set(xlabel="iteration", ylabel="total_loss", title="training loss")
    ax_ap.set(xlabel="iteration", ylabel="COCO box AP", title="validation AP")
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
