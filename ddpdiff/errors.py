"""The one error a user can fix, and the one way every command line reports it."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UsageError(ValueError):
    """Bad input (a config key, a file, an argument); the message is one line naming it and what was expected.

    Every module's own error (ConfigError, DataError, ClipError, …) derives from this, so a command line
    catches one class and anything else stays a traceback: a bug, not a user's mistake.
    """


def cli(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a `main(argv) -> int`: a UsageError becomes `prog: error: message` on stderr and exit status 2."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except UsageError as e:
                print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
                return 2
        return run
    return wrap
