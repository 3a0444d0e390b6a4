"""Training configs once per seed, each run in its own process, and comparing the runs.

`tools/run_synthetic.py` drives this: every run gets a fixed SEED (logged in its config.yaml and
log.txt) and its own folder OUTPUT/<model>/seed<N>, so the same seed gives the same run and
`aa_detection.engine.compare` reports each model as mean, standard deviation and per-seed values.
"""
import os
import subprocess
import sys
import time
from typing import List, Sequence, Tuple

from ..config import setup_cfg

__all__ = ["model_name", "train_seeds"]


def model_name(config_file: str) -> str:
    """The run folder name of a config: its file name without `_synthetic`."""
    return os.path.splitext(os.path.basename(config_file))[0].replace("_synthetic", "")


def train_seeds(train_tool: str, configs: Sequence[str], seeds: Sequence[int], output: str, opts: Sequence[str] = (),
                train: bool = True, trusted: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """Train every config once per seed with the script `train_tool` (tools/train_net.py; one process each,
    one after the other).

    Every config is checked (and its datasets prepared) before the first run starts; `trusted` are the
    config files that may hold Python tags (--trust-config). Returns (the run folders that exist, the
    names of the runs that failed)."""
    plans = []
    for config in configs:
        for seed in seeds:
            out = os.path.join(output, model_name(config), f"seed{seed}")
            run_opts = list(opts) + ["SEED", str(seed), "OUTPUT_DIR", out]
            setup_cfg(config, run_opts, prepare_data=True, trusted=trusted)  # a bad config fails before any training
            plans.append((config, out, run_opts))
    failed, trust = [], [f"--trust-config={f}" for f in trusted]
    for config, out, run_opts in plans if train else ():
        cmd = [sys.executable, train_tool, "--config-file", config, *trust, *run_opts]
        print(">>", " ".join(cmd), flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f">> {out}: exit code {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc != 0:
            failed.append(out)
    return [out for _, out, _ in plans if os.path.isdir(out) and out not in failed], failed
