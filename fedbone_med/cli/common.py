"""Shared command-line plumbing: one-line errors with per-class exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..errors import FedboneError
from ..perf import tune_allocator

NOT_YET = 2


def not_yet(feature: str, issue: str) -> Callable[[argparse.Namespace], int]:
    """A sub-command whose capability has not landed yet: say so plainly, exit 2."""

    def handler(args: argparse.Namespace) -> int:
        print(f"{feature} is not yet available in this version (planned: {issue}).", file=sys.stderr)
        return NOT_YET

    return handler


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
