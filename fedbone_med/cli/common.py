"""Shared command-line plumbing: one-line errors with per-class exit codes."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

from ..errors import FedboneError
from ..perf import tune_allocator

OS_ERROR_EXIT = 12  # a read or write the operating system refused (not one of the project's own checks)


def main_wrapper(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> int:
    """Parse, dispatch, and turn FedboneError into ``error: ...`` plus its exit code."""
    parser = build()
    args = parser.parse_args(argv)
    tune_allocator()
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FedboneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused (full disk, read-only, permissions): say which file, no traceback
        name = errno.errorcode.get(exc.errno or 0, "")
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}{f' ({name})' if name else ''}; fix this (free space, permissions, "
              "the path) and run the command again (with --resume where it has one: checkpoints are written "
              "atomically, so the last complete one is intact)", file=sys.stderr)
        return OS_ERROR_EXIT
