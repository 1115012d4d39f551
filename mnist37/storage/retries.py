"""Retries of object-store requests: what pyarrow (the AWS SDK) does not try again itself.

Each request is tried up to 3 times by pyarrow itself (the AWS SDK's standard retries:
throttling, 5xx, network errors), each try waiting at most `store_timeout_s` for the store to
connect and to answer (`locations.StoreSettings`); a store that never answers stops the job in
about 3 x that, with one line (`no answer from endpoint ... in 12 s after 3 attempts`). What
still fails and may pass (503 SlowDown past the SDK's tries, a connection dropped mid-answer)
is tried again here after an exponentially growing pause, within a total deadline per request;
one that cannot pass (no such bucket, access denied) or that outlasts the deadline stops the
job with one line naming the object:

    s3://images/train/3/10.png: access denied (AWS Error ACCESS_DENIED during GetObject operation)
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mnist37 import Mnist37Error
from mnist37.storage.locations import STORE_ATTEMPTS, store

# Pauses between a request's tries: BACKOFF_S, 2x, 4x ... (at most MAX_BACKOFF_S, with jitter),
# for as long as the request's deadline allows: a burst of 503 SlowDown longer than the SDK's
# own tries is waited out, however many tries that takes.
BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0

# Words in pyarrow's error messages that mean retrying cannot help.
_PERMANENT = {
    "NO_SUCH_BUCKET": "bucket not found",
    "ACCESS_DENIED": "access denied",
    "AccessDenied": "access denied",
    "INVALID_ACCESS_KEY_ID": "invalid access key",
    "SIGNATURE_DOES_NOT_MATCH": "invalid credentials",
    "Forbidden": "access denied",
    "HTTP response code: 403": "access denied",
}

T = TypeVar("T")


class ObjectStoreError(Mnist37Error, OSError):
    """An object store refused a request for good (no such bucket, access denied) or kept
    failing past every retry. Built from one message only, so it pickles as itself through
    a Ray task's error."""

    def __init__(self, message: str):
        super().__init__(message)

    def __str__(self) -> str:
        return self.args[0]


def permanent(error: OSError) -> str | None:
    """What makes `error` final, in words, or None when trying again may help."""
    text = str(error)
    return next((words for marker, words in _PERMANENT.items() if marker in text), None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(" (Request ID")[0]


# Words in pyarrow's error messages that mean the store never answered within StoreSettings'
# timeout_s, after the SDK's own STORE_ATTEMPTS tries: trying again only waits longer.
_SILENT = ("curlCode: 28", "Timeout was reached", "Connection timed out", "Operation timed out")


def _no_answer(uri: str) -> ObjectStoreError:
    settings = store()
    return ObjectStoreError(f"{uri}: no answer from {settings.where()} in {settings.timeout_s:g} s "
                            f"after {STORE_ATTEMPTS} attempts (store_timeout_s)")


_unanswered: set = set()  # requests the main thread stopped waiting for (a signal came)


def unanswered() -> int:
    """How many requests to a store are still waiting for an answer after the main thread
    stopped waiting for them: a process stopped by a signal then exits at once
    (`mnist37.job.run`), rather than in pyarrow's exit handler, which waits for them."""
    return len(_unanswered)


def _answered(request: Callable[[], T]) -> T:
    """`request()`; on the main thread it runs in a thread of its own while the main thread
    waits in short steps, so SIGINT and SIGTERM stop the job at once even while a store keeps
    a request waiting (a signal's handler runs only between the main thread's bytecodes)."""
    if threading.current_thread() is not threading.main_thread():
        return request()
    done, outcome = threading.Event(), []

    def run() -> None:
        try:
            outcome.append((True, request()))
        except BaseException as e:  # handed to the waiting thread
            outcome.append((False, e))
        finally:
            _unanswered.remove(done)
            done.set()

    _unanswered.add(done)

    threading.Thread(target=run, daemon=True, name="mnist37-store-request").start()
    while not done.wait(0.2):
        pass
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def retrying(uri: str, request: Callable[[], T], deadline_s: float | None = None) -> T:
    """`request()`, tried again with exponential backoff while it fails with an OSError that may
    pass and pyarrow did not already try again (503 SlowDown past the SDK's tries, a dropped
    connection mid-answer), until `deadline_s` (default: what the SDK's own tries may take,
    2 x STORE_ATTEMPTS x store_timeout_s) has passed. FileNotFoundError goes to the caller as
    it is; a store that never answered (the SDK's tries each timed out), anything final, or the
    last failure becomes ObjectStoreError naming `uri`."""
    if deadline_s is None:
        deadline_s = 2 * STORE_ATTEMPTS * store().timeout_s
    give_up = time.monotonic() + deadline_s
    for attempt in itertools.count():
        try:
            return _answered(request)
        except FileNotFoundError:
            raise
        except OSError as e:
            if isinstance(e, ObjectStoreError):
                raise
            if (words := permanent(e)) is not None:
                raise ObjectStoreError(f"{uri}: {words} ({_first_line(e)})") from None
            if any(marker in str(e) for marker in _SILENT):
                raise _no_answer(uri) from None
            pause = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** attempt) * random.uniform(0.5, 1.0)
            if time.monotonic() + pause > give_up:
                raise ObjectStoreError(f"{uri}: still failing after {attempt + 1} tries in {deadline_s:.0f} s "
                                       f"({_first_line(e)})") from None
            time.sleep(pause)
