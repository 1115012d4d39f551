"""The evaluation job as a process: flags, Ray, the stages, the output folder, and how it ends.

    python jobs/evaluate.py --data ../shared/data/mnist_sample.tgz --out runs/sample
    python -m mnist37.job ...          (the same, from an installed mnist37)

How it ends, always in one line on stderr: 0 with the table printed; 2 for a bad flag or
config; 1 for a data, storage or cluster problem (`error: ...`); 130 / 143 when stopped by
SIGINT (Ctrl-C) / SIGTERM (`ray job stop`, Kubernetes), saying what was finished and kept.
A Ray the job started is stopped whichever way it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from mnist37 import Mnist37Error
from mnist37.config import Config, build_parser, from_args
from mnist37.storage.locations import StoreSettings, is_uri, local_or_uri, use_store
from mnist37.progress import Status

if TYPE_CHECKING:
    from mnist37.plan import Plan

log = logging.getLogger("mnist37.job")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread. A KeyboardInterrupt, because Ray's calls
    that check for signals while they wait (ray.wait, ray.get) turn only that into their own
    clean KeyboardInterrupt (any other exception raised there surfaces as a SystemError); which
    signal came is kept in `_received` for the exit status."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []  # the signals that stopped the job, in order


def _interrupt(signum, frame) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def _take_signals() -> None:
    """SIGINT and SIGTERM stop the job by an exception in the main thread, so every `finally`
    runs (Ray is stopped, temporaries released). Installed again after `ray.init()`, whose
    core worker installs a SIGTERM handler that dumps stack lines, and after `ray.shutdown()`,
    which restores the default. Not from another thread (the Python API called there), where
    Python allows no handler: the caller's own handling of signals stays."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def parse_args(argv: list[str] | None = None) -> Config:
    """The job's flags: every config key, grouped as --help lists them."""
    parser = build_parser(description="Evaluate fastbook's pixel-similarity baseline (each image's nearest "
                                      "class mean) on a data set, as a Ray job.")
    args = parser.parse_args(argv)
    try:
        return from_args(args)
    except Mnist37Error as e:
        parser.error(str(e))


def main(cfg: Config, status: Status | None = None, exiting: bool = False) -> dict:
    """Run the job; return results.json's contents. Raises Mnist37Error for a problem with
    the input, the storage or the cluster. `exiting` (the command line): the process ends
    right after, with no exit handler run; once the outputs are written, a joined cluster is
    then left without `ray.shutdown()` (`on_ray.session.disconnect`). Without it (in-process:
    `mnist37.evaluate`) nothing here ends the process: a stall or a lost head raises too, and
    a Ray the process already runs (`ray.init()` before the call) is used and left running."""
    # The driver's way to its object store, made once and handed to every task; put back when
    # the job ends, for a caller that runs jobs in-process.
    use_store(StoreSettings.from_environment(cfg.store_timeout_s), driver=True)
    try:
        return _run(cfg, status or Status(), exiting)
    finally:
        use_store(None)


def _run(cfg: Config, status: Status, exiting: bool = False) -> dict:
    from mnist37.locate import locate

    clock = time.perf_counter()
    started_s = process_age_s()  # the interpreter and the imports before this line
    # Before Ray is imported or started: an output folder or chunk store that cannot be
    # written, or a missing or malformed data set, is one line at once.
    status.stage = "locate"
    check_outputs(cfg)
    located = locate(cfg)

    from mnist37.evaluation import evaluate, results_json
    from mnist37.on_ray.session import cluster_cpus, connect, disconnect, join_this_process
    from mnist37.on_ray.tasks import RayExecutor, map_listings
    from mnist37.plan import idle_cpus_note, plan
    from mnist37.report import write_outputs

    status.stage, planned, written = "plan", None, False
    # Before the `try`: the caller's own Ray (a notebook's ray.init()) is used and never stopped.
    callers = join_this_process(cfg.ray_address, cfg.stall_timeout_s)
    try:
        log.info("%s: %s; connecting to Ray (%s)", located.root, located.format, cfg.ray_address or
                 "RAY_ADDRESS, else a cluster `ray start` left on this machine, else a local Ray of the job's own")
        # In-process (the Python API), nothing ends the process from a thread: a stall or a lost
        # head raises from the job's next wait.
        stopped = (lambda signum: _stopped_starting(status, cfg.out, signum)) if exiting else None
        session = callers or connect(cfg.ray_address, cfg.ray_dashboard, cfg.stall_timeout_s,
                                     end_job=_end_job if exiting else None, on_signal=stopped)
        _take_signals()
        log.info("%s", session.joined())
        ray_init_s = time.perf_counter() - clock
        # Class folders are listed by Ray tasks, their file names left in Ray's object store:
        # the driver's memory does not grow with the number of files.
        planned = plan(located, map_listings)
        if note := idle_cpus_note(planned, cluster_cpus()):
            log.info("%s", note)
        evaluation = evaluate(planned, status, RayExecutor(cfg.max_in_flight, cfg.gpus_per_task))
        # Written while Ray still runs: stopping it is the one thing left after the results.
        results = results_json(evaluation, {"start": started_s, "ray_init": ray_init_s,
                                            "total": time.perf_counter() - clock})
        status.stage = "write results"
        out = local_or_uri(located.cfg.out)
        writing_clock = time.perf_counter()
        table = write_outputs(out, results, evaluation.prototypes, evaluation.classification.examples,
                              evaluation.classification.confusions)
        written = True
        log.info("outputs written in %.2f s", time.perf_counter() - writing_clock)
    finally:
        if callers is None:  # the caller's own Ray is left as it was
            disconnect(exiting=exiting and written)
        _take_signals()  # ray.shutdown() puts SIGTERM back to its default (die, no word)
        _clear_temporaries(planned)
    print(table)
    used = sum(sum(c.values()) for c in results["counts"].values())
    rejected = len(results["rejected"])
    print(f"\n{used + rejected} image files = {used} used + {rejected} rejected, in "
          f"{results['elapsed_s']['total']:.2f} s (ray.init {ray_init_s:.2f} s); "
          f"results in {str(out).rstrip('/')}/results.json")
    return results


def check_outputs(cfg: Config) -> None:
    """StorageError (or LocationError) unless the output folder, and the chunk store when one
    is given, can be written: a probe file written and removed (`writes.check_writable`)."""
    from mnist37.storage.writes import check_writable

    check_writable("output folder", cfg.out)
    if cfg.chunk_dir:
        check_writable("chunk store", cfg.chunk_dir)


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0.0): what the interpreter
    and the imports cost before the job's first line, for results.json's `elapsed_s.start`."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _clear_temporaries(planned: Plan | None) -> None:
    """Remove the temporaries of tasks that Ray stopped mid-write (after an error or an
    interrupt) now, not at the next run: a job that ends leaves no .partial in a local chunk
    store. Only abandoned ones go (mnist37.storage.partials), so other jobs' writers are safe."""
    from mnist37.shards import clean_partials

    if planned is not None and not is_uri(planned.chunk_dir):
        clean_partials(Path(planned.chunk_dir))


def interrupted(status: Status, out: str) -> str:
    """One line: where the job was stopped and what the next run will reuse."""
    kept = "they are kept and reused by the next run"
    if status.stage in ("starting", "locate", "plan"):
        return "interrupted before decoding began (while finding and listing the data); nothing to keep"
    if status.stage == "decode":
        return f"interrupted: {status.shards_decoded} of {status.shards_total} shards decoded; {kept}"
    if status.stage == "classify":
        return (f"interrupted while classifying ({status.chunks_classified} of {status.chunks_total} chunks): "
                f"all {status.shards_total} shards decoded; {kept}")
    return f"interrupted while writing results to {out} (results.json not written): all shards decoded; {kept}"


def run(argv: list[str] | None = None) -> int:
    """The command line (jobs/evaluate.py, `mnist37-evaluate`): ends the process, or returns
    the exit status for the caller to exit with. A run that ended well always ends the
    process itself (status 0, no exit handler: see below); to run the job inside a process
    that goes on, call `main`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _take_signals()
    cfg = parse_args(argv)
    status = Status()
    try:
        main(cfg, status, exiting=True)
        # The outputs are written and Ray stopped (or a joined cluster left as it is:
        # on_ray.session.disconnect, whose ray.shutdown() Ray's exit handler would call after
        # all): nothing is left for an exit handler or the interpreter's teardown to do.
        return _ended_now(0)
    except Mnist37Error as e:
        print(f"error: {e}", file=sys.stderr)
        return _ended_now(1) if getattr(e, "ends_process", False) else 1
    except KeyboardInterrupt:  # Interrupted, or Ray's own KeyboardInterrupt for it
        print(interrupted(status, cfg.out), file=sys.stderr)
        return _stopped(128 + (_received[0] if _received else signal.SIGINT))


def _stopped_starting(status: Status, out: str, signum: int) -> NoReturn:
    """A SIGINT or SIGTERM came while ray.init ran (called from the thread that took it, once
    the half-started Ray's processes are stopped): the job's one line, 130 / 143, now."""
    _received.append(signum)
    print(interrupted(status, out), file=sys.stderr)
    _ended_now(128 + signum)


def _stopped(status: int) -> int:
    """`status`, or the process ended now with it when a store request is still out: pyarrow's
    exit handler would wait for its answer (up to 3 x store_timeout_s) before the process ends."""
    from mnist37.storage.retries import unanswered

    return _ended_now(status) if unanswered() else status


def _end_job(error: Mnist37Error) -> NoReturn:
    """Ray did not start within the stall limit, or the Ray head stopped answering (called
    from the thread that watches it): the job's one line, exit 1, now; the chunks written
    stay, a later run's partials cleanup takes what a task left half-written."""
    print(f"error: {error}", file=sys.stderr)
    _ended_now(1)


def _ended_now(status: int) -> NoReturn:
    """End the process with `status` now, its output flushed, no exit handler run (pyarrow's
    waits for unanswered store requests; Ray's, for a head that is gone)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(run())
