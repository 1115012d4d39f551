import dataclasses
import subprocess
import sys

import pytest

from mnist37.config import GROUPS, Config, ConfigError, build_parser, from_args, load, load_file
from mnist37.locate import locate
from tests.conftest import PROJECT_ROOT, make_image_folder


def parse(*argv: str) -> Config:
    return from_args(build_parser().parse_args(list(argv)))


def test_defaults_live_in_the_package_and_read_no_file():
    cfg = parse()
    assert (cfg.data, cfg.train_split, cfg.eval_split, cfg.classes) == ("mnist_sample", "", "", [])
    assert cfg.metrics == ["l1", "l2"] and cfg == Config()


def test_a_data_sets_split_given_as_the_other_split_is_refused(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "mnist_png", {s: {"3": 1, "7": 1} for s in ("training", "testing")})
    monkeypatch.setattr("mnist37.sources.named.download", lambda dataset, cache_dir=None: root)
    with pytest.raises(ConfigError, match=r"eval_split: must differ from train_split \('training'\)"):
        locate(parse("--data", "mnist", "--eval-split", "training"))


def test_a_folder_is_read_with_fastbooks_splits_and_classes(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": {"3": 1, "7": 1}, "valid": {"3": 1, "7": 1}})
    located = locate(parse("--data", str(root)))
    assert (located.cfg.train_split, located.cfg.eval_split, located.classes) == ("train", "valid", ["3", "7"])
    assert located.root == root.resolve()


@pytest.mark.parametrize("argv, expected", [
    ((), ("training", "testing", [str(d) for d in range(10)])),  # mnist brings its own
    (("--classes", "7", "1"), ("training", "testing", ["7", "1"])),  # a flag says otherwise
    (("--eval-split", "training", "--train-split", "testing"), ("testing", "training", [str(d) for d in range(10)])),
])
def test_a_named_data_set_brings_its_splits_and_classes(argv, expected, tmp_path, monkeypatch):
    # What `--data mnist` finds in the cache once downloaded: fastai's layout, made small here.
    root = make_image_folder(tmp_path / "mnist_png", {s: {str(d): 1 for d in range(10)} for s in ("training", "testing")})
    monkeypatch.setattr("mnist37.sources.named.download", lambda dataset, cache_dir=None: root)
    located = locate(parse("--data", "mnist", *argv))
    assert (located.cfg.train_split, located.cfg.eval_split, located.classes) == expected


def test_command_line_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('shard_size = 50\ndevice = "cpu"\nclasses = ["1", "2"]\n')
    cfg = parse("--config", str(path), "--shard-size", "97")
    assert cfg.shard_size == 97  # the flag wins
    assert cfg.device == "cpu"  # the file wins over the default
    assert cfg.classes == ["1", "2"]


@pytest.mark.parametrize("argv", [("--classes", "0", "1", "2"), ("--classes", "0,1,2"), ("--classes", "0, 1", "2")])
def test_list_flags_take_spaces_or_commas(argv):
    assert parse(*argv).classes == ["0", "1", "2"]


def test_every_field_has_a_flag():
    flags = {a.dest for a in build_parser()._actions}
    assert set(Config().to_dict()) <= flags


def test_every_field_has_a_group_a_line_of_help_and_the_choices_validate_allows():
    for f in dataclasses.fields(Config):
        assert f.metadata["group"] in GROUPS and f.metadata["help"], f.name
        for choice in f.metadata["choices"]:  # each choice --help shows is accepted ...
            load(**{f.name: choice})
        if f.metadata["choices"]:  # ... and what it does not show is not
            with pytest.raises(ConfigError, match=f.name):
                load(**{f.name: "none-of-these"})


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("shard_sz = 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'shard_sz'; expected one of data, out, .*shard_size"):
        load_file(path)


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'colour'"):
        load(colour="red")


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("shard_size = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_file(bad)


@pytest.mark.parametrize("overrides, message", [
    ({"shard_size": "abc"}, r"shard_size: expected an integer, got 'abc'"),
    ({"shard_size": -1}, r"shard_size: expected a positive number of images or 0 \(auto\), got -1"),
    ({"shard_size": 1.5}, r"shard_size: expected an integer, got 1.5"),
    ({"shard_size": True}, r"shard_size: expected an integer, got True"),
    ({"device": "tpu"}, r"device: unknown device 'tpu'; expected one of auto, cpu, cuda"),
    ({"metrics": "l1 l3"}, r"metrics: unknown metric 'l3'; expected one of l1, l2"),
    ({"metrics": "l1 l1"}, r"metrics: each metric at most once"),
    ({"metrics": []}, r"metrics: expected at least one of l1, l2"),
    ({"classes": "3"}, r"classes: expected at least two class names"),
    ({"classes": "3 3"}, r"classes: each class at most once"),
    ({"gpus_per_task": 2}, r"gpus_per_task: expected a fraction in \(0, 1\], got 2"),
    ({"gpus_per_task": "half"}, r"gpus_per_task: expected a number, got 'half'"),
    ({"max_in_flight": -1}, r"max_in_flight: expected 0 \(auto\) or a positive count"),
    ({"stall_timeout_s": 0}, r"stall_timeout_s: expected a positive number of seconds, got 0"),
    ({"store_timeout_s": -1}, r"store_timeout_s: expected a positive number of seconds, got -1"),
    ({"train_split": "train", "eval_split": "train"}, r"eval_split: must differ from train_split"),
    ({"data": 3}, r"data: expected a string, got 3"),
])
def test_bad_values_are_rejected_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(**overrides)


def test_job_rejects_bad_flag_with_one_line_and_exit_2():
    """The one subprocess among the flag tests: the real entry point, as a user runs it."""
    run = subprocess.run([sys.executable, "jobs/evaluate.py", "--shard-size", "-3"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "shard_size: expected a positive number of images or 0 (auto), got -3" in run.stderr
    assert "Traceback" not in run.stderr
