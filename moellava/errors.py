"""How the command-line entry points report a bad input: one message that says what is wrong and how to
fix it, no traceback.

Our checks raise ValueError (bad arguments, data, checkpoints) or OSError (files, disks) with such a
message; `run_main` turns it into `SystemExit("error: ...")`, which prints the message and exits with
status 1. Anything else is a bug and keeps its traceback; `MOELLAVA_TRACEBACK=1` shows the traceback of
every error.
"""

import os
from typing import Callable, Optional, Sequence

USER_ERRORS = (ValueError, OSError)


def run_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None):
    """`main(argv)`, with a bad input reported as one message (see the module docstring)."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        if os.environ.get("MOELLAVA_TRACEBACK") == "1":
            raise
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        raise SystemExit(f"error{where}: {err}") from None
