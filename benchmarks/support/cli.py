"""A lab tool's command line ends as the jobs' do: exit status 0, or 1 with one line
`error: ...` for a problem with the input, the storage or the cluster (`Mnist37Error`), never a
traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from mnist37 import Mnist37Error


def exit_status(run: Callable[[], object]) -> int:
    """`run()`'s own exit status where it returns one (an int; anything else: 0), or 1 with its
    error on one line of stderr."""
    try:
        status = run()
    except Mnist37Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0
