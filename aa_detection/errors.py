"""The errors that mean "the user's input is wrong", and how the tools and training workers report them.

Every message names the file, key, image id or annotation id at fault and says what is allowed, so a
tool prints the message alone (no traceback) and exits with status 2:

    UserError
    ├── ConfigError        a config file, key or value (also a ValueError)
    ├── DatasetError       a dataset file, image or annotation, or datasets that do not fit together
    │                      (also a ValueError)
    ├── WeightsError       a weights or checkpoint file
    │   └── UnsafePickleError   a pickle holding more than tensors, arrays and containers (also a pickle.UnpicklingError)
    ├── InputError         an input image or results file of the visualizer
    ├── UsageError         command-line arguments that do not fit together
    └── MissingDependencyError   an optional package the chosen feature needs (also an ImportError)

A non-finite training loss (detectron2's `FloatingPointError`, which names the iteration and the losses)
is reported the same way; `USER_ERRORS` lists what is.
"""
import contextlib
import pickle
import sys
from typing import Callable, Iterator, Optional, TextIO

__all__ = ["UserError", "ConfigError", "DatasetError", "WeightsError", "UnsafePickleError", "InputError",
           "UsageError", "MissingDependencyError", "USER_ERRORS", "exit_on_user_error", "launch_reporting_user_errors"]


class UserError(Exception):
    """Input that cannot be used; the message says which and what is allowed."""


class ConfigError(UserError, ValueError):
    """A config file, key or value that cannot be used; raised before any model is built."""


class DatasetError(UserError, ValueError):
    """A dataset file, image or annotation that cannot be used, or datasets that do not fit together."""


class WeightsError(UserError):
    """A weights or checkpoint file that cannot be used."""


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
    """A pickle holds objects beyond tensors, arrays and plain containers."""


class InputError(UserError):
    """An input file of the visualizer (image, results) that cannot be read; the message names it."""


class UsageError(UserError):
    """Command-line arguments that are missing or do not fit together."""


class MissingDependencyError(UserError, ImportError):
    """An optional package that the chosen feature needs is not installed; the message names the install."""


USER_ERRORS = (UserError, FloatingPointError)


@contextlib.contextmanager
def exit_on_user_error(stream: Optional[TextIO] = None) -> Iterator[None]:
    """Print a user error's message (no traceback) and exit with status 2; other errors pass through."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"ERROR ({type(e).__name__}): {e}", file=stream or sys.stderr)
        sys.exit(2)


class _SendUserErrors:
    """A worker function for `launch`: a user error goes to the launching process through `queue`,
    and the worker exits with status 2 instead of printing a traceback."""

    def __init__(self, main_func, queue):
        self.main_func, self.queue = main_func, queue

    def __call__(self, *args):
        try:
            return self.main_func(*args)
        except USER_ERRORS as e:
            self.queue.put(e)
            sys.exit(2)


def launch_reporting_user_errors(main_func: Callable, num_processes_per_machine: int, num_machines: int = 1,
                                 machine_rank: int = 0, dist_url: Optional[str] = None, args: tuple = ()) -> None:
    """detectron2's `launch(main_func, ...)`; when it spawns workers, the first user error raised in
    any of them is raised again here, once, instead of a traceback per worker.

    `main_func` must be picklable (a module-level function), as for `launch` itself.
    """
    from detectron2.engine import launch
    import torch.multiprocessing as mp

    if num_machines * num_processes_per_machine == 1:
        return launch(main_func, 1, args=args)
    queue = mp.get_context("spawn").SimpleQueue()
    try:
        launch(_SendUserErrors(main_func, queue), num_processes_per_machine, num_machines=num_machines,
               machine_rank=machine_rank, dist_url=dist_url, args=args)
    except mp.ProcessExitedException:
        if queue.empty():
            raise
        raise queue.get() from None
