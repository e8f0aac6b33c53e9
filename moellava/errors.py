"""How the command-line entry points report a bad input: one message that says what is wrong and how to
fix it, no traceback.

Our checks raise ValueError (bad arguments, data, checkpoints) or OSError (files, disks) with such a
message; `run_main` prints it as `error: ...` and exits with status 1. Anything else is a bug and keeps its
traceback; `MOELLAVA_TRACEBACK=1` shows the traceback of every error.
"""

import os
import sys
from typing import Callable, Optional, Sequence

USER_ERRORS = (ValueError, OSError)


def run_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    try:
        main(argv)
    except USER_ERRORS as err:
        if os.environ.get("MOELLAVA_TRACEBACK") == "1":
            raise
        report(err)
        sys.exit(1)


def report(err: BaseException) -> None:
    rank = os.environ.get("RANK")
    world = os.environ.get("WORLD_SIZE", "1")
    where = f" (rank {rank})" if rank is not None and world != "1" else ""
    print(f"error{where}: {err}", file=sys.stderr, flush=True)
