"""Errors that mean "the user's input is wrong", and how the command-line tools report them.

Each message names the file, key, image id or annotation id at fault and what is allowed, so the
tools print the message alone (no traceback) and exit with status 2.
"""
import contextlib
import sys

__all__ = ["ConfigError", "DatasetError", "USER_ERRORS", "exit_on_user_error"]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; raised before any model is built."""


class DatasetError(ValueError):
    """A dataset file, image or annotation that cannot be used."""


def _user_errors():
    from .safe_io import UnsafePickleError

    return (ConfigError, DatasetError, UnsafePickleError, FloatingPointError)


USER_ERRORS = _user_errors()


@contextlib.contextmanager
def exit_on_user_error(stream=None):
    """Print a user error's message (no traceback) and exit with status 2; other errors pass through."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"ERROR ({type(e).__name__}): {e}", file=stream or sys.stderr)
        sys.exit(2)
