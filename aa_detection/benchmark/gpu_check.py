"""The whole GPU check in one command, on a machine that has no package registry: what is missing is
installed from carried files, then the CUDA tests, the attention and model benchmarks and a short
training run, each step in its own process with a deadline, each writing its results as it gets them.

Steps (`STEPS`, or those --steps names); step i must end by the start plus the shares of --budget of
steps 0..i (the shares of the steps run, scaled to sum to 1), so time a step leaves unused goes to the next
ones, and a step that overruns is stopped, the later ones still run:

  environment  torch, CUDA and the GPU; pip installs of the REQUIREMENTS whose import fails, from the
               --wheels folder (into --work-dir/site, put on PYTHONPATH, where site-packages is not
               writable), detectron2 built from --detectron2-archive where `import detectron2.modeling`
               fails (its CUDA ops where nvcc is found; if the build fails, its source on PYTHONPATH,
               without the compiled ops, which RetinaNet does not use) and the project
               (`pip install --no-build-isolation --no-deps -e .`, without the CPU attention kernel,
               which no CUDA step uses)
  tests        pytest tests/test_cuda.py, each test's outcome written as it ends
  attention    the attention benchmark (flex, fused, naive where it fits; bf16 inputs), first
               FlexAttention's compile time on the res5, res4 and res3 maps in that order, with empty
               Inductor and Triton caches of its own
  model        AA-R-50 against R-50 RetinaNet at 800x1333 under bf16 autocast, training batch 2, then 8
  training     50 iterations of configs/retinanet_AA_R_50_FPN_1x.yaml on the synthetic shapes resized to
               800x1333: the loss stays finite and metrics.json has attention/<stage>/alive 1.0
  report       BENCHMARKS.md rendered (into --work-dir) from the output folder's JSON

The output folder holds at most 8 files: gpu_check.log (every step's output), summary.json (the steps'
status and the targets, rewritten after each step), environment.json, tests.json, training.json, and
the benchmark results in the form tools/make_benchmarks.py renders (attention_cuda_bf16.json,
model_res3-res5_cuda_bf16.json for batch 2, model_res3-res5_cuda_bf16_batch8.json). Build logs, the
training run and the caches go to --work-dir. Targets are reported as met or not; only a step that fails
or runs out of time makes the exit status 1.

--dry-run walks every step on the CPU at tiny sizes: the wheels are resolved for the GPU machine's Python
(pip install --dry-run) and the archive opened, but nothing is installed where the imports work.
"""
import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["REQUIREMENTS", "STEPS", "main", "run_steps", "targets"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# import name: the requirement installed from --wheels where that import fails (the tested versions).
REQUIREMENTS = {
    "pycocotools": "pycocotools==2.0.11",
    "fvcore": "fvcore==0.1.5.post20221221",
    "iopath": "iopath==0.1.9",
    "yacs": "yacs==0.1.8",
    "omegaconf": "omegaconf==2.3.1",
    "hydra": "hydra-core==1.3.8",
    "antlr4": "antlr4-python3-runtime==4.9.3",
    "termcolor": "termcolor==3.3.0",
    "tabulate": "tabulate==0.10.0",
    "portalocker": "portalocker==4.4.2",
    "cloudpickle": "cloudpickle==3.1.3",
    "pkg_resources": "setuptools==80.10.2",  # detectron2.model_zoo imports it; setuptools 81 dropped it
    "pytest": "pytest==9.2.0",
    "pluggy": "pluggy==1.7.0",
    "iniconfig": "iniconfig==2.3.1",
}
# The GPU machine's Python and platforms, for which the wheels are downloaded and (--dry-run) resolved.
GPU_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# (step, share of --budget)
STEPS = (("environment", 0.28), ("tests", 0.24), ("attention", 0.17), ("model", 0.16), ("training", 0.12),
         ("report", 0.03))
DEFAULT_BUDGET_S = 480
LOG_FILE, SUMMARY_FILE = "gpu_check.log", "summary.json"
TRAIN_CONFIG = "configs/retinanet_AA_R_50_FPN_1x.yaml"
AA_VARIANT = "res3-res5"  # the stages the AA config augments, as tools/make_benchmarks.py names them
STAGES = ("res3", "res4", "res5")
TRAIN_STEP_LIMIT = MEMORY_LIMIT = 1.3  # AA / R-50: training step time, training peak memory
DENSE_TEST = "test_flex_allocates_no_dense_matrix_at_res3"  # in tests/test_cuda.py


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one kind of run: the GPU check, or its CPU walk-through (--dry-run)."""

    device: str
    amp: Optional[str]
    attention_flags: Tuple[str, ...]
    model_size: Tuple[int, int]
    model_batches: Tuple[int, ...]  # training batches; the first one's results file has no suffix
    model_flags: Tuple[str, ...]
    train_opts: Tuple[str, ...]
    train_iterations: int


GPU_PLAN = Plan(
    device="cuda", amp="bf16",
    attention_flags=("--sizes", "res5,res4,res3", "--paths", "naive,fused,flex", "--repeats", "3",
                     "--compile-times", "res5,res4,res3"),
    model_size=(800, 1333), model_batches=(2, 8), model_flags=("--repeats", "3", "--warmup", "1", "--no-stages"),
    # from scratch: unit-variance inputs (as the synthetic configs), fp16 autocast (SOLVER.AMP)
    train_opts=("INPUT.MIN_SIZE_TRAIN", "(800,)", "INPUT.MAX_SIZE_TRAIN", "1333", "SOLVER.IMS_PER_BATCH", "4",
                "SOLVER.AMP.ENABLED", "True", "MODEL.PIXEL_STD", "[57.375, 57.120, 58.395]",
                "DATALOADER.NUM_WORKERS", "4"),
    train_iterations=50,
)
DRY_PLAN = Plan(
    device="cpu", amp=None,
    attention_flags=("--sizes", "res5", "--paths", "naive,fused,kernel,flex", "--repeats", "1",
                     "--compile-times", "8x12,12x16"),
    model_size=(128, 192), model_batches=(1, 2), model_flags=("--repeats", "1", "--warmup", "0", "--no-stages"),
    train_opts=("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "SOLVER.IMS_PER_BATCH", "2",
                "MODEL.PIXEL_STD", "[57.375, 57.120, 58.395]", "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"),
    train_iterations=3,
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of tools/gpu_check.py."""
    p = parser
    p.add_argument("--output", default="gpu_check", help="folder of the results (at most 8 files)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "aa_gpu_check"),
                   help="folder of the build logs, installs, training run and caches")
    p.add_argument("--wheels", default=None, help="folder of the wheels to install what is missing from")
    p.add_argument("--detectron2-archive", default=None, help="detectron2 source archive to build if it is missing")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for all steps; step i ends by the start plus the shares of steps 0..i")
    p.add_argument("--steps", default=",".join(name for name, _ in STEPS), help="comma list of the steps to run")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    p.add_argument("--requirements", action="store_true", help="print the wheels' requirements, one a line, and exit")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a step's own process
    return p


def plan_of(args: argparse.Namespace) -> Plan:
    return DRY_PLAN if args.dry_run else GPU_PLAN


def result_key(plan: Plan) -> str:
    """The device[_amp] part of the benchmark files' names (as tools/make_benchmarks.py names them)."""
    return plan.device + (f"_{plan.amp}" if plan.amp else "")


def model_file(plan: Plan, batch: int) -> str:
    suffix = "" if batch == plan.model_batches[0] else f"_batch{batch}"
    return f"model_{AA_VARIANT}_{result_key(plan)}{suffix}.json"


def write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Log:
    """The run's log file, shared with the steps' processes (they write their output straight into it)."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def run_command(command: Sequence[str], timeout: float, output, env: Optional[Dict[str, str]] = None,
                cwd: str = ROOT) -> Tuple[str, Optional[int], float]:
    """Runs `command` with its output to the file `output`, stopped (its whole process group) after
    `timeout` seconds; returns (status "ok", "failed" or "timeout", exit status or None, seconds)."""
    start = time.monotonic()
    if timeout <= 0:
        return "timeout", None, 0.0
    output.flush()
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env, cwd=cwd, start_new_session=True)
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        return "timeout", None, time.monotonic() - start
    return ("ok" if returncode == 0 else "failed"), returncode, time.monotonic() - start


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL 10 s later if it is still there."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def child_env(work: str, dry_run: bool, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of the steps' processes: PYTHONPATH with the installs of --work-dir made by the
    environment step (site/, detectron2's source where it could not be built) and the repository."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    paths = [p for p in (site_dir(work), detectron2_source_dir(work)) if os.path.isdir(p)] + [ROOT]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if os.path.isdir(os.path.join(site_dir(work), "bin")):
        env["PATH"] = os.path.join(site_dir(work), "bin") + os.pathsep + env.get("PATH", "")
    if not dry_run:
        env["AA_DETECTION_NO_EXTENSION"] = "1"  # not built there: no warning that it is missing
    return env


def step_env(name: str, work: str) -> Dict[str, str]:
    """A step's own environment variables: the attention step compiles with empty Inductor and Triton caches
    of its own, so that the FlexAttention compile times it measures are a first run's."""
    if name != "attention":
        return {}
    cache = os.path.join(work, "inductor-cache-attention")
    shutil.rmtree(cache, ignore_errors=True)
    return {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}


def site_dir(work: str) -> str:
    return os.path.join(work, "site")


def detectron2_source_dir(work: str) -> str:
    """Where detectron2's source is unpacked (its top folder holds the package) when it cannot be built."""
    return os.path.join(work, "detectron2-source", "detectron2")


# ----------------------------------------------------------------------------------------- orchestration
def run_steps(steps: Sequence[Tuple[str, float, Callable[[float], Tuple[str, Optional[int]]]]], budget: float,
              on_step_end: Callable[[str, Dict], None], log: Log) -> Dict[str, Dict]:
    """Runs steps (name, share of the budget, run(seconds allowed) -> (status, exit status)) in order, step i
    allowed until the start plus the shares of steps 0..i (scaled to sum to 1); calls on_step_end(name, record)
    after each. A step that raises is "failed" and the next one runs. Returns {name: record}."""
    start, share_sum, records = time.monotonic(), 0.0, {}
    total_share = sum(share for _, share, _ in steps)
    for name, share, run in steps:
        share_sum += share / total_share
        allowed = start + budget * share_sum - time.monotonic()
        log(f"== {name}: start, {max(allowed, 0):.0f} s allowed")
        step_start = time.monotonic()
        try:
            status, returncode = run(allowed) if allowed > 0 else ("timeout", None)
        except Exception as e:  # this step's failure is recorded, the later steps still run
            log(f"{name}: {type(e).__name__}: {e}")
            status, returncode = "failed", None
        records[name] = {"status": status, "returncode": returncode, "seconds": round(time.monotonic() - step_start, 1),
                         "allowed_s": round(max(allowed, 0), 1)}
        log(f"== {name}: {status} in {records[name]['seconds']} s")
        on_step_end(name, records[name])
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    """tools/gpu_check.py: the check (exit status 0 when every step ran to its end), or one step in its own
    process (--step)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = add_arguments(argparse.ArgumentParser(description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter)).parse_args(argv)
    if args.requirements:
        print("\n".join(REQUIREMENTS.values()))
        return 0
    args.output, args.work_dir = os.path.abspath(args.output), os.path.abspath(args.work_dir)
    if args.step:
        return STEP_FUNCTIONS[args.step](args, plan_of(args))
    return check(args, argv)


def check(args: argparse.Namespace, argv: Sequence[str]) -> int:
    plan = plan_of(args)
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(wanted) - {name for name, _ in STEPS}
    if unknown:
        raise SystemExit(f"--steps: unknown {sorted(unknown)}; the steps are {', '.join(n for n, _ in STEPS)}")
    os.makedirs(args.output, exist_ok=True)
    os.makedirs(os.path.join(args.work_dir, "logs"), exist_ok=True)
    log = Log(os.path.join(args.output, LOG_FILE))
    command = shlex.join(["tools/gpu_check.py", *argv])
    log(f"gpu_check: {command}; output {args.output}, work dir {args.work_dir}, budget {args.budget:.0f} s"
        + (", dry run on the CPU" if args.dry_run else ""))
    summary = {"command": command, "dry_run": args.dry_run, "budget_s": args.budget,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}, "targets": []}

    def step_runner(name):
        if name == "environment":
            return lambda allowed: environment_step(args, time.monotonic() + allowed, log)

        def run(allowed):
            command = [sys.executable, "-m", "aa_detection.benchmark.gpu_check", "--step", name, "--output",
                       args.output, "--work-dir", args.work_dir] + (["--dry-run"] if args.dry_run else [])
            env = child_env(args.work_dir, args.dry_run, step_env(name, args.work_dir))
            status, returncode, _ = run_command(command, allowed, log.file, env)
            return status, returncode
        return run

    def on_step_end(name, record):
        summary["steps"][name] = record
        summary["targets"] = targets(args.output, plan)
        write_json(os.path.join(args.output, SUMMARY_FILE), summary)

    steps = [(name, share, step_runner(name)) for name, share in STEPS if name in wanted]
    records = run_steps(steps, args.budget, on_step_end, log)
    for t in summary["targets"]:
        verdict = "----" if t["met"] is None else ("PASS" if t["met"] else "FAIL")
        log(f"{verdict} {t['target']}: {t['measured']} (limit {t['limit']})")
    failed = [name for name, r in records.items() if r["status"] != "ok"]
    log("gpu_check: " + (f"steps not completed: {', '.join(failed)}" if failed else "every step completed"))
    return 1 if failed else 0


# ------------------------------------------------------------------------------------- environment step
PROBE_TORCH = r"""
import json, os, platform, sys, torch
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
try:  # where a build finds nvcc (None: detectron2 builds without its CUDA ops)
    from torch.utils.cpp_extension import CUDA_HOME
    info["cuda_home"] = CUDA_HOME
except Exception as e:
    info["cuda_home"] = "unknown (%s: %s)" % (type(e).__name__, e)
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(), capability="%d.%d" % torch.cuda.get_device_capability(),
                gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for name in ("triton", "torchvision", "timm", "cv2", "numpy"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:
        info[name] = "missing (%s)" % type(e).__name__
print(json.dumps(info))
"""
PROBE_IMPORTS = r"""
import importlib, json, sys, warnings
warnings.simplefilter("ignore")
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = [True, str(getattr(importlib.import_module(name), "__version__", "importable"))]
    except Exception as e:
        found[name] = [False, "%s: %s" % (type(e).__name__, e)]
print(json.dumps(found))
"""


def probe(code: str, args: Sequence[str], env: Dict[str, str], timeout: float, cwd: str) -> Dict:
    """The JSON that `python -c code args` prints last (its run in a fresh process)."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=max(timeout, 1))
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def site_packages_writable() -> bool:
    """Whether pip may install into this Python's site-packages: writable and, outside a virtual environment,
    not marked externally managed (PEP 668)."""
    paths = sysconfig.get_paths()
    managed = sys.prefix == sys.base_prefix and os.path.exists(os.path.join(paths["stdlib"], "EXTERNALLY-MANAGED"))
    return os.access(paths["purelib"], os.W_OK) and not managed


def environment_step(args: argparse.Namespace, deadline: float, log: Log) -> Tuple[str, Optional[int]]:
    """Records the environment and installs what is missing (see the module docstring) into environment.json,
    rewritten after each part."""
    work = args.work_dir
    record = {"site_packages_writable": site_packages_writable()}
    path = os.path.join(args.output, "environment.json")
    neutral = os.path.join(work, "logs")  # a folder where the repository is not importable as such

    def left():
        return deadline - time.monotonic()

    def save(**values):
        record.update(values)
        write_json(path, record)

    def imports(names, with_repository=True):
        env = child_env(work, args.dry_run)
        if not with_repository:
            env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if p != ROOT)
        return probe(PROBE_IMPORTS, names, env, min(left(), 120), neutral)

    def pip(name, pip_args, timeout, extra_env=None):
        """pip with its output in --work-dir/logs/NAME.log; the log's tail goes to the main log on failure."""
        log_path = os.path.join(work, "logs", f"{name}.log")
        with open(log_path, "w") as output:
            status, code, seconds = run_command(
                [sys.executable, "-m", "pip", *pip_args, "--disable-pip-version-check", "--no-cache-dir"],
                min(timeout, left()), output, dict(os.environ, **(extra_env or {})), cwd=work)
        if status != "ok":
            with open(log_path) as f:
                log(f"{name}: pip {status} ({code}); the end of {log_path}:\n" + "".join(f.readlines()[-25:]))
        return {"status": status, "seconds": round(seconds, 1), "log": log_path}

    target = [] if site_packages_writable() else ["--target", site_dir(work), "--upgrade"]
    save(torch=probe(PROBE_TORCH, [], child_env(work, args.dry_run), min(left(), 120), neutral))
    log(f"environment: {json.dumps(record['torch'])}")

    found = imports(list(REQUIREMENTS))
    missing = [REQUIREMENTS[name] for name, (ok, _) in found.items() if not ok]
    save(requirements={name: text for name, (_, text) in found.items()}, missing=missing)
    if args.wheels and args.dry_run:
        save(wheels_resolve=pip("wheels", ["install", "--dry-run", "--ignore-installed", "--no-index", "--no-deps",
                                           "--find-links", os.path.abspath(args.wheels), "--only-binary=:all:",
                                           "--target", os.path.join(work, "resolve"), "--python-version", GPU_PYTHON,
                                           "--implementation", "cp", "--abi", "cp" + GPU_PYTHON.replace(".", ""),
                                           *(f"--platform={p}" for p in WHEEL_PLATFORMS),
                                           *REQUIREMENTS.values()], 120))
    if missing and not args.dry_run:
        if not args.wheels:
            raise RuntimeError(f"{', '.join(missing)} missing and no --wheels folder given")
        install = ["install", "--no-index", "--no-deps", "--find-links", os.path.abspath(args.wheels), *target]
        save(wheels_install=pip("wheels", install + missing, 120))
        if record["wheels_install"]["status"] != "ok":  # one at a time: what can be installed is
            save(wheels_install={r: pip("wheel-" + r.split("==")[0], install + [r], 60)["status"] for r in missing})
        found = imports([name for name, r in REQUIREMENTS.items() if r in missing])
        save(still_missing=[REQUIREMENTS[name] for name, (ok, _) in found.items() if not ok])

    save(detectron2=install_detectron2(args, record["torch"], imports, pip, target, left, log))
    project = imports(["aa_detection"], with_repository=False)["aa_detection"]
    if project[0]:
        save(project="installed")
    elif args.dry_run or not site_packages_writable():
        save(project="from the repository on PYTHONPATH")
    else:
        installed = pip("project", ["install", "--no-index", "--no-build-isolation", "--no-deps", "-e", ROOT], left(),
                        {"AA_DETECTION_NO_EXTENSION": "1"})
        save(project=installed if installed["status"] == "ok" else dict(installed, then="the repository on PYTHONPATH"))
    final = imports(["detectron2.modeling", "aa_detection.modeling", "fvcore.nn", "pycocotools.coco",
                     "torch.utils.tensorboard"])
    save(imports={name: text for name, (_, text) in final.items()})
    broken = [name for name, (ok, _) in final.items() if not ok]
    if broken:
        log(f"environment: still not importable: {', '.join(broken)}")
    return ("failed" if broken else "ok"), None


def install_detectron2(args, torch_info, imports, pip, target, left, log) -> Dict:
    """detectron2 as found, built from the archive, or (the build failed) its source on PYTHONPATH."""
    archive = args.detectron2_archive
    state = {}
    if archive:
        with tarfile.open(archive) as tar:
            state["archive_holds_setup_py"] = any(m.name.rstrip("/") == "detectron2/setup.py" for m in tar)
    found = imports(["detectron2.modeling", "detectron2._C"])
    state["compiled_ops"] = found["detectron2._C"][0]
    if found["detectron2.modeling"][0]:
        return dict(state, status="importable", version=found["detectron2.modeling"][1])
    if not archive:
        raise RuntimeError("detectron2 is not importable and no --detectron2-archive given")
    shutil.rmtree(os.path.dirname(detectron2_source_dir(args.work_dir)), ignore_errors=True)  # an earlier fallback
    arch = torch_info.get("capability") or "9.0"
    build_env = {"MAX_JOBS": str(os.cpu_count() or 16), "TORCH_CUDA_ARCH_LIST": arch}
    log(f"detectron2: building {archive} ({build_env}, nvcc from {torch_info.get('cuda_home')})")
    state["build"] = pip("detectron2", ["install", "--no-index", "--no-build-isolation", "--no-deps", *target,
                                        os.path.abspath(archive)], left() - 30, build_env)
    if state["build"]["status"] != "ok":
        with tarfile.open(archive) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(os.path.dirname(detectron2_source_dir(args.work_dir)), **safe)
        log("detectron2: the build did not finish; its source is on PYTHONPATH, without compiled ops")
        state["status"] = "source on PYTHONPATH"
    else:
        state["status"] = "built"
    found = imports(["detectron2.modeling", "detectron2._C"])
    return dict(state, compiled_ops=found["detectron2._C"][0], importable=found["detectron2.modeling"][0])


# -------------------------------------------------------------------------- the steps' own processes
def tests_step(args: argparse.Namespace, plan: Plan) -> int:
    """pytest tests/test_cuda.py; tests.json gets each test's outcome and seconds as it ends."""
    import pytest

    path = os.path.join(args.output, "tests.json")
    outcomes = {}

    class Recorder:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                entry = {"outcome": report.outcome, "seconds": round(report.duration, 2)}
                if report.outcome == "failed":
                    entry["message"] = str(report.longrepr)[-3000:]
                elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                    entry["message"] = report.longrepr[2]
                outcomes[report.nodeid] = entry
                write_json(path, outcomes)

    write_json(path, outcomes)
    return int(pytest.main(["-v", "-p", "no:cacheprovider", "tests/test_cuda.py"], plugins=[Recorder()]))


def attention_step(args: argparse.Namespace, plan: Plan) -> int:
    """The attention benchmark as tools/benchmark_attention.py runs it, into attention_<key>.json."""
    from . import attention

    path = os.path.join(args.output, f"attention_{result_key(plan)}.json")
    flags = ["--device", plan.device, *(["--amp", plan.amp] if plan.amp else []), *plan.attention_flags, "--json", path]
    _timed_benchmark(attention, flags, path, "tools/benchmark_attention.py")
    return 0


def model_step(args: argparse.Namespace, plan: Plan) -> int:
    """The model benchmark (AA-R-50 against R-50) as tools/benchmark.py runs it, once per training batch,
    in one process (FlexAttention's compiled graphs serve both)."""
    from . import model

    for batch in plan.model_batches:
        path = os.path.join(args.output, model_file(plan, batch))
        flags = ["--size", *map(str, plan.model_size), "--device", plan.device,
                 *(["--amp", plan.amp] if plan.amp else []), "--train-batch", str(batch), *plan.model_flags,
                 "--json", path]
        _timed_benchmark(model, flags, path, "tools/benchmark.py")
    return 0


def _timed_benchmark(module, flags: List[str], path: str, tool: str) -> None:
    """Runs a benchmark module's main with the flags, then adds {"command", "seconds"} under "run" in its
    JSON (the Runs table of BENCHMARKS.md)."""
    start = time.perf_counter()
    module.main(module.add_arguments(argparse.ArgumentParser()).parse_args(flags))
    results = read_json(path)
    folder = os.path.dirname(path)
    results["run"] = {"command": f"{tool} {shlex.join(flags)}".replace(folder, "FOLDER"),
                      "seconds": time.perf_counter() - start}
    write_json(path, results)


def training_step(args: argparse.Namespace, plan: Plan) -> int:
    """A short training of the AA config on the synthetic shapes (tools/train_net.py's main), then its
    metrics.json checked: a finite loss and attention/<stage>/alive 1.0 for res3, res4 and res5."""
    from ..engine.compare import read_metrics
    from ..engine.trainer import argument_parser, main as train

    out = os.path.join(args.work_dir, "train")
    opts = ["MODEL.WEIGHTS", "", "DATASETS.TRAIN", '("synthetic_train",)', "DATASETS.TEST", "()",
            "DATASETS.SYNTHETIC.ROOT", os.path.join(args.work_dir, "datasets", "synthetic"),
            "DATASETS.SYNTHETIC.NUM_TRAIN", "64", "DATASETS.SYNTHETIC.NUM_VAL", "8",
            "SOLVER.MAX_ITER", str(plan.train_iterations), "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100000",
            "TEST.EVAL_PERIOD", "0", "SEED", "1", "OUTPUT_DIR", out, *plan.train_opts]
    command = ["--config-file", os.path.join(ROOT, TRAIN_CONFIG), *opts]
    shutil.rmtree(out, ignore_errors=True)  # a run of an earlier check: start afresh
    start = time.perf_counter()
    train(argument_parser().parse_args(command))
    records = read_metrics(os.path.join(out, "metrics.json"))
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    alive = {stage: [r[f"attention/{stage}/alive"] for r in records if f"attention/{stage}/alive" in r]
             for stage in STAGES}
    result = {
        "command": shlex.join(["tools/train_net.py", *command]).replace(args.work_dir, "WORK"),
        "seconds": time.perf_counter() - start,
        "iterations": max((r["iteration"] for r in records), default=-1) + 1,
        "total_loss": losses,
        "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "alive": alive,
        "all_alive": all(values and all(v == 1.0 for v in values) for values in alive.values()),
        "attention_to_conv": {stage: [r[f"attention/{stage}/attention_to_conv"] for r in records
                                      if f"attention/{stage}/attention_to_conv" in r] for stage in STAGES},
    }
    write_json(os.path.join(args.output, "training.json"), result)
    print(f"training: loss {losses}, alive {alive}")
    return 0 if result["loss_finite"] and result["all_alive"] else 1


def report_step(args: argparse.Namespace, plan: Plan) -> int:
    """BENCHMARKS.md rendered from the output folder into --work-dir, its GPU section printed."""
    from . import report

    text = report.render(report.load_results(args.output))
    path = os.path.join(args.work_dir, "BENCHMARKS.md")
    with open(path, "w") as f:
        f.write(text)
    start = text.find("\n## GPU")
    print(text[start:text.find("\n## Runs")] if plan.device == "cuda" else text)
    print(f"wrote {path}")
    return 0


STEP_FUNCTIONS = {"tests": tests_step, "attention": attention_step, "model": model_step,
                  "training": training_step, "report": report_step}


# ------------------------------------------------------------------------------------------------ targets
def targets(output: str, plan: Plan) -> List[Dict]:
    """The targets, from whatever results the output folder holds: [{"target", "limit", "measured", "met"}],
    met None where not measured."""
    from .report import ATTENTION_FLOOR_LIMIT

    rows = []

    def add(target, limit, measured, met):
        rows.append({"target": target, "limit": limit, "measured": measured, "met": met})

    lean = "flex" if plan.device == "cuda" else "kernel"
    attention = read_json(os.path.join(output, f"attention_{result_key(plan)}.json"))
    by_size = {row["size"]: row for row in (attention or {}).get("rows", [])}
    for size in ("res5", "res4", "res3"):
        figures = by_size.get(size, {}).get("paths", {}).get(lean, {})
        for mode in ("forward", "train"):
            if mode in figures:
                multiple = figures[mode]["floor_multiple"]
                add(f"attention {size} {mode} ({lean}) time / floor", f"<= {ATTENTION_FLOOR_LIMIT:g}",
                    f"{multiple:.2f}", multiple <= ATTENTION_FLOOR_LIMIT)
    res3 = by_size.get("res3")
    dense = None if res3 is None else res3["naive_logits_bytes"] / 2  # (B, Nh, HW, HW) in bf16
    for mode in ("forward", "train"):
        figures = (res3 or {}).get("paths", {}).get(lean, {}).get(mode)
        add(f"attention res3 {mode} ({lean}) peak memory below the dense (B, Nh, HW, HW) bf16 logits",
            "-" if dense is None else f"< {dense / 2**30:.2f} GiB",
            "not measured" if figures is None else f"{figures['peak_bytes'] / 2**30:.2f} GiB",
            None if figures is None else figures["peak_bytes"] < dense)
    tests = read_json(os.path.join(output, "tests.json")) or {}
    outcome = next((v["outcome"] for k, v in tests.items() if k.endswith("::" + DENSE_TEST)), None)
    add("tests/test_cuda.py: no (HW, HW) allocation in a flex training call at res3", "passed",
        outcome or "not run", None if outcome in (None, "skipped") else outcome == "passed")

    for batch in plan.model_batches:
        result = read_json(os.path.join(output, model_file(plan, batch)))
        for key, label, limit in (("train_iter_s", "training step time", TRAIN_STEP_LIMIT),
                                  ("train_peak_GiB", "training peak memory", MEMORY_LIMIT)):
            name = f"AA-R-50 / R-50 {label}, batch {batch}"
            if result is None or key not in result["aa"]:
                add(name, f"<= {limit:g}", "not measured", None)
                continue
            a, b = (result[n][key] for n in ("aa", "baseline"))
            a, b = (x["median"] if isinstance(x, dict) else x for x in (a, b))
            add(name, f"<= {limit:g}", f"{a / b:.3f}", a / b <= limit)

    training = read_json(os.path.join(output, "training.json"))
    if training is None:
        add("training: the loss stays finite", "finite", "not run", None)
        add("training: attention/<stage>/alive in metrics.json", "1.0 for res3, res4, res5", "not run", None)
    else:
        add("training: the loss stays finite", "finite", str(training["total_loss"]), training["loss_finite"])
        add("training: attention/<stage>/alive in metrics.json", "1.0 for res3, res4, res5",
            json.dumps(training["alive"]), training["all_alive"])
    return rows


if __name__ == "__main__":
    sys.exit(main())
