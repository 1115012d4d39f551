"""The whole evaluation on a real local Ray: shard-count invariance, counts, and the real data."""

import os
from pathlib import Path

import numpy as np
import pytest

from mnist37.config import load
from mnist37.evaluation import evaluate, results_json
from mnist37.plan import plan
from mnist37.locate import locate
from mnist37.on_ray.tasks import RayExecutor

pytestmark = pytest.mark.ray  # a local Ray


def run(tmp_path, data, shard_size, **overrides):
    overrides.setdefault("out", str(tmp_path / f"out-{shard_size}"))
    cfg = load(data=str(data), shard_size=shard_size, **overrides)
    evaluation = evaluate(plan(locate(cfg)), executor=RayExecutor(cfg.max_in_flight, cfg.gpus_per_task))
    return results_json(evaluation), evaluation.prototypes


def assert_same_evaluation(runs):
    (first, first_protos), *rest = runs
    for results, protos in rest:
        assert protos.tobytes() == first_protos.tobytes()  # bit-identical
        for metric in first["metrics"]:
            assert results["metrics"][metric] == first["metrics"][metric]
        assert results["counts"] == first["counts"]
        assert results["data"]["fingerprint"] == first["data"]["fingerprint"]


def test_one_seven_and_sixty_four_shards_agree(ray_local, image_folder, tmp_path):
    runs = [run(tmp_path, image_folder, size) for size in (128, 19, 2)]
    assert [r["shards"]["count"]["train"] for r, _ in runs] == [1, 7, 64]
    assert_same_evaluation(runs)
    results, protos = runs[0]
    assert protos.shape == (2, 8, 8) and protos.dtype == np.float32
    assert results["counts"] == {"train": {"3": 64, "7": 64}, "valid": {"3": 12, "7": 12}}
    # The synthetic classes are far apart: every metric gets them all right.
    for metric in ("l1", "l2"):
        assert results["metrics"][metric]["overall_accuracy"] == 1.0


def test_per_shard_records_and_chunks(ray_local, image_folder, tmp_path):
    results, _ = run(tmp_path, image_folder, 10, chunk_dir=str(tmp_path / "my-chunks"))
    per_shard = results["shards"]["per_shard"]
    assert [(s["split"], s["index"]) for s in per_shard] == \
        [("train", i) for i in range(13)] + [("valid", i) for i in range(3)]
    assert sum(s["num_images"] for s in per_shard) == 128 + 24
    assert all(s["decode_node_id"] for s in per_shard)
    assert all(s["classify_node_id"] for s in per_shard if s["split"] == "valid")
    assert sorted(os.listdir(tmp_path / "my-chunks" / "valid")) == [f"valid-10-00000{i}.arrow" for i in range(3)]
    assert set(results["elapsed_s"]) == {"scan", "decode", "prototypes", "classify"}


def test_classes_order_sets_indices(ray_local, image_folder, tmp_path):
    forward, _ = run(tmp_path, image_folder, 32)
    backward, _ = run(tmp_path, image_folder, 32, classes="7 3", out=str(tmp_path / "back"))
    assert backward["classes"] == ["7", "3"]
    assert np.array(backward["metrics"]["l1"]["confusion"])[::-1, ::-1].tolist() == forward["metrics"]["l1"]["confusion"]


def test_mnist_sample_shard_invariance_and_counts(ray_local, mnist_sample_tgz, cache_dir, tmp_path):
    runs = [run(tmp_path, mnist_sample_tgz, size, cache_dir=str(cache_dir)) for size in (20000, 1771, 194)]
    assert [r["shards"]["count"]["train"] for r, _ in runs] == [1, 7, 64]
    assert_same_evaluation(runs)
    results, _ = runs[0]
    root = Path(results["data"]["root"])
    on_disk = {split: {c: len([f for f in os.listdir(root / split / c) if f.endswith(".png")]) for c in ("3", "7")}
               for split in ("train", "valid")}
    assert results["counts"] == on_disk
    assert sum(sum(c.values()) for c in results["counts"].values()) == 14434



def run_here(tmp_path, data, name: str, executor=None):
    """(results, prototypes, evaluation) of the stages run through `executor` (default: in this
    process), decoding into a chunk store of their own."""
    cfg = load(data=str(data), shard_size=19, out=str(tmp_path / "out"), chunk_dir=str(tmp_path / f"chunks-{name}"))
    evaluation = evaluate(plan(locate(cfg)), executor=executor)
    assert not any(r.reused for r in evaluation.decoding.shards)
    return results_json(evaluation), evaluation.prototypes, evaluation


def test_in_process_the_stages_run_in_this_process_or_in_forked_ones(image_folder, tmp_path):
    """Without Ray, the same stages (mnist37.steps.InProcess): decode steps in this process or
    in forked ones, to the same figures; where each step ran comes back beside its record."""
    from mnist37.steps import InProcess

    serial, forked = (run_here(tmp_path, image_folder, name, executor)
                      for name, executor in (("serial", None), ("forked", InProcess(workers=3))))
    assert_same_evaluation([serial[:2], forked[:2]])
    assert serial[0]["counts"] == {"train": {"3": 64, "7": 64}, "valid": {"3": 12, "7": 12}}
    assert {s["decode_node_id"] for s in serial[0]["shards"]["per_shard"]} == {""}  # no Ray node
    assert {p.pid for p in serial[2].decoding.placements.values()} == {os.getpid()}
    assert serial[0]["memory"]["workers"] == 1  # every step in this process
    assert forked[0]["memory"]["workers"] > 1  # decode steps in forked processes, classify here


def test_on_ray_and_in_process_the_same_stages_give_the_same_evaluation(ray_local, image_folder, tmp_path):
    cfg = load(data=str(image_folder))
    on_ray = run_here(tmp_path, image_folder, "ray", RayExecutor(cfg.max_in_flight, cfg.gpus_per_task))
    assert_same_evaluation([on_ray[:2], run_here(tmp_path, image_folder, "here")[:2]])
    placements = on_ray[2].decoding.placements
    assert {p.node_id for p in placements.values()} == {ray_local.get_runtime_context().get_node_id()}
    assert all(p.pid != os.getpid() for p in placements.values())  # Ray's workers
    assert set(on_ray[2].classification.placements) == {r.chunk_path for r in on_ray[2].decoding.shards
                                                        if r.split == "valid"}
