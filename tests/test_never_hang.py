"""Never hang, never wait in silence (issue 23): every wait bounded and reporting, a store that
never answers as one line, Ray refusing the job as one line, the cluster named, a stop that
always stops, Ray's node dying as one line.

Real parts only: a loopback TCP server that accepts connections and never answers, the S3 test
server (moto) behind a fault proxy that holds some or all requests unanswered, `ray start` heads
of the test's own (stopped by their process ids, in their own temp dirs, so no
/tmp/ray/ray_current_cluster is left), and the job as a user runs it. Limits are made small
through the settings (stall_timeout_s, store_timeout_s); tests wait for events, never for time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mnist37.paths import StoreMismatch, StoreSettings, open_location, use_store
from mnist37.progress import Stalled, Watch

from tests.conftest import PROJECT_ROOT, make_image_folder
from tests.s3server import FaultProxy, aws_env, serving


# ---------------------------------------------------------------- the watch on a wait (clock patched)


class Clock:
    def __init__(self):
        self.now = 1000.0  # time.monotonic() counts from boot: any value will do

    def __call__(self) -> float:
        return self.now


def test_watch_reports_what_is_outstanding_then_stops(caplog):
    clock = Clock()
    watch = Watch("list", 4, " class folders", stall_s=90, report_s=30, clock=clock,
                  describe=lambda: ("the cluster at 127.0.0.1:6379 shows 0 of 2 CPUs free", "none is free"))
    clock.now += 29
    watch.waiting(4)
    assert not caplog.records
    clock.now += 1
    with caplog.at_level("WARNING"):
        watch.waiting(4)
    assert caplog.records[-1].getMessage() == ("list: 0/4 class folders done, 4 tasks pending for 30 s; "
                                               "the cluster at 127.0.0.1:6379 shows 0 of 2 CPUs free")
    clock.now += 60
    with pytest.raises(Stalled, match=r"^list: 0/4 class folders done, 4 tasks pending and none finished in 90 s "
                                      r"\(stall_timeout_s\); the cluster at 127.0.0.1:6379 shows 0 of 2 CPUs free: "
                                      r"none is free$"):
        watch.waiting(4)


def test_watch_never_stops_a_slow_job_that_moves():
    clock = Clock()
    watch = Watch("decode", 100, " shards", stall_s=10, report_s=5, clock=clock)
    for _ in range(100):  # each task takes 9 s, 900 s in all: far past the stall limit, never stalled
        clock.now += 9
        watch.waiting(2)
        watch.finished()
    assert watch.done == 100


# ---------------------------------------------------------------- store settings


def test_store_settings_come_from_the_environment():
    env = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-3",
           "AWS_S3_ADDRESSING_STYLE": "virtual", "AWS_SECRET_ACCESS_KEY": "secret"}
    settings = StoreSettings.from_environment(7.0, env)
    assert settings == StoreSettings("http://minio:9000", "eu-west-3", True, 7.0)
    assert "secret" not in repr(settings)  # credentials stay on each node
    assert StoreSettings.from_environment(environ={"AWS_ENDPOINT_URL_S3": "http://a:1",
                                                   "AWS_ENDPOINT_URL": "http://b:2"}).endpoint == "http://a:1"


def test_a_task_whose_node_names_another_endpoint_stops_the_job(monkeypatch):
    """The driver reached AWS itself (no endpoint); a task's node sets AWS_ENDPOINT_URL, which
    the AWS SDK would read: the task stops with one line naming both."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    try:
        use_store(StoreSettings(endpoint=None, region="us-east-1"))  # as a task receives it
        with pytest.raises(StoreMismatch, match=r"object store settings differ: the driver reached s3://b at AWS's "
                                                r"own endpoint \(no AWS_ENDPOINT_URL\), but this task on .* would use "
                                                r"endpoint http://127.0.0.1:9 \(its own AWS_ENDPOINT_URL\)"):
            open_location("s3://b/data")
        use_store(StoreSettings(endpoint="http://127.0.0.1:8", region="us-east-1"))  # the driver's endpoint wins
        assert open_location("s3://b/data")[1] == "b/data"
    finally:
        use_store(None)
