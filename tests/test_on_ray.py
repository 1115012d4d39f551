"""The Ray layer (mnist37.on_ray) on a real local Ray: bounded submission, errors from tasks, placements."""

import os
import shutil
import time

import numpy as np
import pytest
import ray

from mnist37.on_ray import scheduling, session, tasks
from mnist37.storage.locations import store
from mnist37.png import DecodeError
from mnist37.images import Decoding
from mnist37.sources.folder import list_split, list_splits, make_shards
from mnist37.sources.folder_listing import ClassFiles
from mnist37.steps import DecodeRequest
from tests.conftest import ray_cpus_each

pytestmark = pytest.mark.ray  # a local Ray


def decoded(shards, root, chunk_dir, max_in_flight: int) -> list:
    """(record, placement) of each shard, decoded by Ray's decode tasks (8x8 images, train sums)."""
    requests = [DecodeRequest(s, str(root), str(chunk_dir), Decoding((8, 8)), s.split == "train", None, store())
                for s in shards]
    return list(tasks.decode_shards(requests, None, max_in_flight))


@ray.remote(num_cpus=1)
def _slow_square(x: int) -> int:
    time.sleep(0.01 * (x % 3))
    return x * x


@pytest.mark.parametrize("max_in_flight", [1, 3, 50])
def test_bounded_map_returns_every_result_and_bounds_the_window(ray_local, max_in_flight):
    submitted, received = [0], []

    def submit(x):
        assert submitted[0] - len(received) < max_in_flight  # never more than the window unfinished
        submitted[0] += 1
        return _slow_square.remote(x)

    for result in scheduling.bounded_map(submit, range(20), max_in_flight):
        received.append(result)
    assert sorted(received) == [x * x for x in range(20)]


@ray.remote(num_cpus=0)
def _gated(x: int, gate: str) -> int:
    scheduling._record_node()
    while not os.path.exists(gate):
        time.sleep(0.02)
    return x


def test_a_lost_nodes_tasks_are_submitted_again_and_each_item_counts_once(ray_local, tmp_path, monkeypatch):
    """Once a node the job saw alive is declared dead, every item whose task ran there (each
    task notes its node as it starts) is submitted again at once, the stall count starts again,
    the watch's lines say what the job waits for, and the first result of each item is the one
    counted. The loss is told as Session.check_nodes tells it, of this Ray's one node (a node
    really cut off mid-job: tests/test_hosts.py)."""
    monkeypatch.setattr(session, "_session", session.Session())  # no node alive: the one here is lost
    gate, node = tmp_path / "go", ray.get_runtime_context().get_node_id()
    submitted = []

    def submit(x, again=0):
        submitted.append((x, again))
        return _gated.options(**scheduling._again(again)).remote(x, str(gate))

    watch = session.watching("decode", 3, " shards")
    flight = scheduling._InFlight(submit, watch)
    for index in range(3):
        flight.add(index, index * 10)
    deadline = time.monotonic() + 60
    while len(flight._nodes([refs[-1] for refs in flight.attempts.values()])) < 3:  # every task started
        assert time.monotonic() < deadline, "the tasks did not start"
        time.sleep(0.05)
    watch.since -= 1000  # as if nothing had finished for long
    assert flight.retry({node: "10.0.0.9"}) == {node: 3}
    assert sorted(submitted) == [(0, 0), (0, 1), (10, 0), (10, 1), (20, 0), (20, 1)]  # again: a class of its own
    assert time.monotonic() - watch.since < 5  # the stall count started again
    state, _ = watch.describe()
    assert "; waiting for node 10.0.0.9's 3 tasks, submitted again at " in state
    gate.touch()
    finished = [flight.next() for _ in range(3)]
    assert sorted(index for index, _ in finished) == [0, 1, 2] and len(flight) == 0
    assert sorted(ray.get([ref for _, ref in finished])) == [0, 10, 20]
    assert "waiting for node" not in watch.describe()[0]


def test_default_window_is_twice_the_cpus(ray_local):
    assert session.default_max_in_flight() == 2 * int(ray.cluster_resources()["CPU"])


def test_decode_shards_on_ray(ray_local, image_folder, tmp_path):
    shards = make_shards(list_split(image_folder, "train", ["3", "7"]), 10)
    placed = decoded(shards, image_folder, tmp_path, 4)
    done = [d for d, _ in placed]
    assert sorted(d.index for d in done) == list(range(13))
    assert all(where.node_id == ray.get_runtime_context().get_node_id() for _, where in placed)
    assert all(where.pid > 0 and where.gpu_ids == [] and d.peak_rss_bytes > 0 for d, where in placed)
    assert all(d.pixel_sums is not None for d in done)
    total = np.sum([d.counts for d in done], axis=0)
    assert total.tolist() == [64, 64]
    # Sums come back for the classes a shard holds: one row, but for the shard across both folders.
    held = {d.index: d.pixel_sums.classes.tolist() for d in done}
    assert held == {i: [0] if i < 6 else [0, 1] if i == 6 else [1] for i in range(13)}
    assert all(d.pixel_sums.sums.shape == (len(held[d.index]), 8, 8) for d in done)


def test_listing_tasks_leave_the_file_names_in_the_object_store(ray_local, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "LISTING_BLOCK", 25)  # the driver tells the listing tasks
    here = list_splits(image_folder, ["train", "valid"], ["3", "7"])
    listed = list_splits(image_folder, ["train", "valid"], ["3", "7"], map_folders=tasks.map_listings)
    # The driver holds counts, the first names and refs to blocks of names, not the names.
    for split in ("train", "valid"):
        assert listed[split].counts().tolist() == here[split].counts().tolist()
        assert all(isinstance(b, ray.ObjectRef) for f in listed[split].folders for b in f.blocks)
        assert [f.head.tolist() for f in listed[split].folders] == [f.head.tolist() for f in here[split].folders]
        fetched = [ClassFiles.concatenate(ray.get(f.blocks)).names.tolist() for f in listed[split].folders]
        assert fetched == [f.files().names.tolist() for f in here[split].folders]
    block = listed["train"].folders[0].block_size
    assert [len(b) for b in ray.get(listed["train"].folders[0].blocks)] == \
        [min(block, 64 - a) for a in range(0, 64, block)]  # 64 training 3s in blocks
    for size in (10, 64, 100, 1000):
        shards = make_shards(listed["train"], size)
        assert all(isinstance(b, ray.ObjectRef) for s in shards for r in s.runs for b in r.files)
        assert [s.resolved(ray.get).paths for s in shards] == [s.paths for s in make_shards(here["train"], size)]
    shards = make_shards(listed["train"], 10)
    # A shard across the class boundary: 64 images of "3", so shard 6 holds the last 4 of them and 6 of "7".
    assert [(r.class_index, r.start, r.stop) for r in shards[6].runs] == [(0, 60 % block, 64 - 60 // block * block),
                                                                        (1, 0, 6)]
    assert all(isinstance(b, ClassFiles) for r in shards[6].resolved(ray.get).runs for b in r.files)
    done = [d for d, _ in decoded(shards, image_folder, tmp_path, 4)]
    assert sorted(d.index for d in done) == list(range(13))
    assert np.sum([d.counts for d in done], axis=0).tolist() == [64, 64]


def test_listing_tasks_each_list_a_run_of_folders(ray_local, tmp_path, monkeypatch):
    """Fewer listing tasks than folders (one per CPU here, LISTING_TASKS_PER_CPU): each task
    lists a run of folders, a folder's names in several blocks; every folder comes back in
    order with its own blocks, as listed in this process."""
    from tests.conftest import make_image_folder

    classes = [f"c{i}" for i in range(7)]
    root = make_image_folder(tmp_path / "data", {split: {c: 3 + 5 * i for i, c in enumerate(classes)}
                                                 for split in ("train", "valid")})
    monkeypatch.setattr(tasks, "LISTING_TASKS_PER_CPU", 1)
    monkeypatch.setattr(tasks, "LISTING_BLOCK", 4)
    here = list_splits(root, ["train", "valid"], classes)
    listed = list_splits(root, ["train", "valid"], classes, map_folders=tasks.map_listings)
    assert int(ray.cluster_resources()["CPU"]) < 2 * len(classes)  # so tasks list several folders each
    for split in ("train", "valid"):
        assert [f.class_name for f in listed[split].folders] == classes
        assert listed[split].counts().tolist() == here[split].counts().tolist()
        assert [len(f.blocks) for f in listed[split].folders] == [-(-(3 + 5 * i) // 4) for i in range(7)]
        fetched = [ClassFiles.concatenate(ray.get(f.blocks)).names.tolist() for f in listed[split].folders]
        assert fetched == [f.files().names.tolist() for f in here[split].folders]


def test_a_data_error_in_a_task_arrives_as_itself(ray_local, image_folder, tmp_path):
    shards = make_shards(list_split(image_folder, "train", ["3", "7"]), 10)
    shutil.rmtree(image_folder / "train" / "7")  # gone between listing and decoding
    with pytest.raises(DecodeError) as error:
        [d for d, _ in decoded(shards, image_folder, tmp_path, 2)]
    assert str(error.value) == "train/7/: cannot open folder (No such file or directory)"  # one line, no traceback


def test_bad_files_come_back_as_rejections(ray_local, image_folder, tmp_path):
    shards = make_shards(list_split(image_folder, "train", ["3", "7"]), 10)
    (image_folder / shards[4].paths[2]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    done = [d for d, _ in decoded(shards, image_folder, tmp_path, 2)]
    assert [r for d in done for r in d.rejected] == [(shards[4].paths[2], "truncated PNG")]
    assert sum(d.num_images for d in done) == 127


def test_cluster_info_names_the_nodes(ray_local):
    info = session.cluster_info()
    assert info["cluster_resources"]["CPU"] == ray_cpus_each()  # what the session's Ray was started with
    assert [n["node_id"] for n in info["nodes"]] == [ray.get_runtime_context().get_node_id()]


def test_every_task_takes_one_request_record_and_at_most_five_arguments():
    """The Ray boundary: each task's first parameter is a frozen request record, and no task
    takes more than five (the classify task also takes the objects Ray fetches before it starts)."""
    import dataclasses
    import inspect
    import typing

    for function in (tasks._decode_task._function, tasks._decode_and_ship_task._function,
                     tasks._classify_task._function, tasks._listed_in_blocks):
        parameters = list(inspect.signature(function).parameters.values())
        assert len(parameters) <= 5 and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters), function
        record = typing.get_type_hints(function)[parameters[0].name]
        assert dataclasses.is_dataclass(record) and record.__dataclass_params__.frozen, function
