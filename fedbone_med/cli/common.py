"""Shared command-line plumbing: one-line errors with per-class exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..errors import FedboneError
from ..perf import tune_allocator


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
