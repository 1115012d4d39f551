"""Scheduling on Ray: a bounded window of tasks, every wait bounded and watched, failures told.

`bounded_map` submits at most `max_in_flight` tasks at once and yields results as they finish;
`_InFlight` keeps each item's attempts and submits again, at once, an item whose task ran on a
node Ray declares dead (each task notes its node as it starts: `_record_node`). A task's own
mnist37 error comes back as itself (`_raise_cause`); Ray failing under the job is one
ClusterError line (`_cluster_failures`). The tasks themselves are mnist37.on_ray.tasks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NoReturn

import ray

from mnist37 import Mnist37Error
from mnist37.on_ray.probe import WAIT_STEP_S, ClusterError
from mnist37.on_ray.session import _failed_under, current, watching
from mnist37.progress import Stalled, Watch


# Where each task runs: every task notes its node in the GCS's key-value store as it starts
# (one small write, under the job's id and its task id), so that once Ray declares a node dead
# the driver knows which of its tasks ran there without asking that node (_InFlight.retry).
_WHERE = b"mnist37-where"


def _record_node() -> None:
    """Note in the GCS which node runs this task (a hint: without it, the job submits the
    task again on any node's loss)."""
    from ray.experimental import internal_kv

    context = ray.get_runtime_context()
    with contextlib.suppress(Exception):  # noqa: BLE001: a hint only, see above
        internal_kv._internal_kv_put(f"{context.get_job_id()}/{context.get_task_id()}", context.get_node_id(),
                                     namespace=_WHERE)


# How long a failed map waits for its other tasks to end before it raises (see _raise_cause).
SETTLE_S = 60.0


def _raise_cause(error: ray.exceptions.RayTaskError, pending: Sequence) -> NoReturn:
    """Let the tasks still `pending` (refs, or streaming generators) end, for up to SETTLE_S,
    then raise a task's mnist37 error as itself (one clear line, not a remote traceback),
    anything else as Ray raised it.

    They are not cancelled: cancelling a task whose reply is already on its way aborts Ray
    2.60's core worker, the driver's included (task_manager.cc "Check failed ... Tried to
    complete task that was not pending"; seen with a full chunk store, where the tasks fail
    together). A task that runs to its end leaves its chunk whole or not at all, and at most
    `max_in_flight` tasks are pending, each one shard's work. Any still running after SETTLE_S
    end with the job's Ray or with the driver."""
    ends = [p.completed() if isinstance(p, ray.ObjectRefGenerator) else p for p in pending]
    deadline = time.monotonic() + SETTLE_S
    while ends and time.monotonic() < deadline:  # in short steps, so a signal still stops the job
        _, ends = ray.wait(ends, num_returns=len(ends), timeout=WAIT_STEP_S, fetch_local=False)
    if isinstance(error.cause, Mnist37Error):
        raise error.cause from None
    raise error


def bounded_map(submit: Callable[[object], ray.ObjectRef], items: Iterable, max_in_flight: int,
                received: Callable[[ray.ObjectRef, object], object] = lambda ref, value: value,
                what: tuple[str, str] = ("tasks", "")) -> Iterator:
    """Submit `submit(item)` for each item with at most `max_in_flight` unfinished; yield
    `received(ref, result)` as tasks finish, once per item. Every wait is bounded and watched
    (`_InFlight.next`: `what` names the stage and its unit in its lines); an item whose task
    ran on a node Ray declares dead is submitted again at once (`_InFlight.retry`), and its
    first result counts. A task that fails with an mnist37 error re-raises that error (one
    clear line, not a remote traceback) once the tasks still pending have ended
    (`_raise_cause`). An interrupt leaves them to `ray.shutdown()` (the job's own Ray) or to
    the driver's exit (a cluster's tasks die with their owner); neither path cancels a task
    (see `_raise_cause`)."""
    items = list(items) if not isinstance(items, Sequence) else items
    watch = watching(what[0], len(items), what[1])
    flight = _InFlight(submit, watch)

    def next_result():
        _, ref = flight.next()
        value = received(ref, _get(ref, watch))
        watch.finished()
        return value

    try:
        with _cluster_failures(watch):
            for index, item in enumerate(items):
                if len(flight) >= max_in_flight:
                    yield next_result()
                flight.add(index, item)
            while flight:
                yield next_result()
        current().check_nodes(watch, 0, force=True)  # a node lost while the last tasks ran
        flight.forget()
    except ray.exceptions.RayTaskError as e:
        _raise_cause(e, flight.handles())


class _InFlight:
    """A map's tasks in flight, by item: each item's attempts (a task, or a streaming
    generator: `handle`, waited on through `end(handle)`), the first to finish counts, the
    others are forgotten (never waited on, never counted; decode, classify and listing are
    idempotent: chunk writes are atomic, identical data gives identical keys).

    Why attempts: Ray fails a task already pushed to a worker on a lost host only when the
    driver's gRPC connection to that worker is found dead (keepalive: 300 s + 120 s with Ray's
    defaults), not when the GCS declares the node dead (benchmarks/host_loss). So once a node is
    declared dead, every item whose latest attempt ran there, or was not yet seen running on a
    node that is alive (its lease request may wait on the lost node's raylet), is submitted
    again at once, as `submit(item, again=n)` for its n-th attempt after a loss: its task then
    takes `_again(n)`'s options, so that Ray leases it a worker of its own rather than queue it
    behind the lost attempt (see _again)."""

    def __init__(self, submit: Callable[[object], object], watch: Watch, end: Callable[[object], ray.ObjectRef] = lambda h: h):
        self.submit, self.watch, self.end = submit, watch, end
        self.items: dict[int, object] = {}  # index -> item, while in flight
        self.attempts: dict[int, list[ray.ObjectRef]] = {}  # index -> end refs, oldest first
        self.index_of: dict[ray.ObjectRef, int] = {}
        self.handle_of: dict[ray.ObjectRef, object] = {}
        self.recovering: dict[int, tuple[str, str]] = {}  # index -> (lost node's address, when submitted again)
        self.job = ray.get_runtime_context().get_job_id()
        watch.describe = self.describe

    def __len__(self) -> int:
        return len(self.items)

    def add(self, index: int, item: object) -> None:
        self.items[index], self.attempts[index] = item, []
        self._attempt(index)

    def _attempt(self, index: int) -> None:
        again = len(self.attempts[index])
        handle = self.submit(self.items[index], again=again) if again else self.submit(self.items[index])
        ref = self.end(handle)
        self.attempts[index].append(ref)
        self.index_of[ref], self.handle_of[ref] = index, handle

    def handles(self) -> list:
        return list(self.handle_of.values())

    def next(self) -> tuple[int, object]:
        """(index, handle) of the next item whose attempt finished: `ray.wait` in steps of
        WAIT_STEP_S, telling the watch of each step that ends with nothing finished (a line
        every 30 s, Stalled after stall_timeout_s), looking for lost nodes (Session.check_nodes)
        and submitting their tasks again."""
        while True:
            # fetch_local=False: ready anywhere is enough (a result is fetched by _get); a wait
            # that fetched would call the raylet, and a dead raylet's caller is ended by Ray.
            done, _ = ray.wait(list(self.index_of), num_returns=1, timeout=WAIT_STEP_S, fetch_local=False)
            current().check_raylet(self.watch)
            current().check_nodes(self.watch, len(self), retry=self.retry)
            if done:
                index = self.index_of[done[0]]
                handle = self.handle_of[done[0]]
                for ref in self.attempts.pop(index):
                    del self.index_of[ref], self.handle_of[ref]
                del self.items[index]
                self.recovering.pop(index, None)
                return index, handle
            current().check_head()
            self.watch.waiting(len(self))

    def _nodes(self, refs: list[ray.ObjectRef]) -> dict[ray.ObjectRef, str]:
        """ref -> the node its task was last seen running on (_record_node), where known."""
        from ray.experimental import internal_kv

        keys = {f"{self.job}/{ref.task_id().hex()}".encode(): ref for ref in refs}
        try:
            found = internal_kv.global_gcs_client.internal_kv_multi_get(list(keys), _WHERE, timeout=5)
        except Exception:  # noqa: BLE001: unknown, so submitted again: a duplicate costs one task
            return {}
        return {keys[key]: node.decode() for key, node in found.items() if node}

    def retry(self, lost: dict[str, str]) -> dict[str | None, int]:
        """Submit again each item whose latest attempt ran on a `lost` node (node id ->
        address) or was not seen running; start the stall count again (Ray works on a
        recovery). Returns how many per lost node (None: not seen running)."""
        latest = {index: refs[-1] for index, refs in self.attempts.items()}
        where = self._nodes(list(latest.values()))
        alive, when, counts = current().nodes, time.strftime("%H:%M:%S"), {}
        for index, ref in latest.items():
            node = where.get(ref)
            if node in alive:
                continue
            self._attempt(index)
            counts[node if node in lost else None] = counts.get(node if node in lost else None, 0) + 1
            # one not seen running is waited for on account of the first node lost
            self.recovering[index] = (lost.get(node) or next(iter(lost.values())), when)
        self.watch.renew()
        return counts

    def describe(self) -> tuple[str, str]:
        """The cluster's state (Session.describe), and what the job waits for after a node's loss."""
        state, cause = current().describe()
        waits: dict[str, list] = {}
        for address, when in self.recovering.values():
            waits.setdefault(address, []).append(when)
        for address, times in waits.items():
            state += (f"; waiting for node {address}'s {len(times)} task{'s' if len(times) != 1 else ''}, "
                      f"submitted again at {max(times)}")
        return state, cause

    def forget(self) -> None:
        """Drop the GCS's notes of where this job's tasks ran (_record_node), once the map
        has ended (a map that failed leaves them: a few small keys, not a wait on the head)."""
        from ray.experimental import internal_kv

        with contextlib.suppress(Exception):  # noqa: BLE001: a few stale keys at worst
            internal_kv.global_gcs_client.internal_kv_del(f"{self.job}/".encode(), True, _WHERE, timeout=5)


def _get(ref: ray.ObjectRef, watch: Watch):
    """The value of a finished task (`_wait` returned it: ready, and inlined in the reply
    unless large), fetched within the stall limit."""
    try:
        return ray.get(ref, timeout=current().stall_s)
    except ray.exceptions.GetTimeoutError:
        raise Stalled(f"{watch.outstanding(1)}: a finished task's result could not be fetched in "
                      f"{current().stall_s:g} s (stall_timeout_s)") from None


@contextlib.contextmanager
def _cluster_failures(watch: Watch) -> Iterator[None]:
    """Ray itself failing under the job (its node's raylet gone, the head unreachable, a
    result lost with its node past Ray's retries) as one ClusterError line; a task's own
    error (RayTaskError) goes on to the caller."""
    try:
        yield
    except ray.exceptions.RayTaskError:
        raise
    except ray.exceptions.RayError as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        current().check_raylet(watch)  # Ray's error for it (LocalRayletDiedError) told the job's way
        raise ClusterError(_failed_under(watch, f"{type(e).__name__}{': ' + text[:200] if text else ''}")) from None


def _again(again: int) -> dict:
    """Ray options for a task's `again`-th attempt after a node's loss (none for the first).
    In the first task's scheduling class (function, resources, strategy) an attempt once
    waited 95 s with 1 of 1 CPUs free, most likely because Ray's driver asks for workers per
    class and for no more than the class has tasks queued, so a lease request it had sent to
    the lost node's raylet (which no reply ends before the connection's keepalive) held it. A
    class of its own per generation of attempts (the default strategy, and `again` bytes of
    memory, which every node has) got it a worker at once (benchmarks/host_loss)."""
    return {"scheduling_strategy": "DEFAULT", "memory": again} if again else {}
