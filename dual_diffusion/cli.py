"""What the command-line entry points share: a usage error is `error: ...` on stderr, exit status 2."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable


class UsageError(Exception):
    """A bad argument or input file: reported without a traceback."""


def run_command(parse_args: Callable[[Any], Any], run: Callable[[Any], dict], argv=None) -> int:
    """Parses argv, runs, prints the result (unless None) as JSON; a UsageError prints `error: ...` and
    returns 2."""
    args = parse_args(argv)
    try:
        result = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:  # None: a process of a multi-host run other than the one that reports
        print(json.dumps(result, indent=2))
    return 0
