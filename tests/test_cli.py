"""The command lines a user reads: each entry point's --help lists its own flags in groups, each
with its choices and default; flags it does not use are not listed (and still accepted)."""

import re

import pytest

from mnist37 import convert_job, job


def help_of(parse_args, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    """--help with its lines joined: what a phrase says, wherever argparse wrapped it."""
    return " ".join(text.split())


def flags_listed(text: str) -> set[str]:
    """The flags --help lists, each at the start of its own entry."""
    return set(re.findall(r"^  (--[a-z-]+)", text, re.MULTILINE))


def test_the_jobs_help_lists_every_group_each_flag_with_its_default(capsys):
    text = help_of(job.parse_args, capsys)
    for group in ("data:", "decoding:", "classify:", "Ray:", "output:"):
        assert f"\n{group}\n" in text
    assert "--device {auto,cpu,cuda}" in flat(text) and "--metrics {l1,l2} [{l1,l2} ...]" in flat(text)
    assert "--format {auto,folder,parquet,webdataset,idx}" in flat(text)
    for default in ("(default: 0)", "(default: l1 l2)", "(default: true)"):
        assert default in flat(text)
    assert "(default: all for mnist, else 3 7)" in flat(text)  # an empty default says what it means
    assert {"--data", "--shard-size", "--metrics", "--ray-address", "--out", "--config"} <= flags_listed(text)
    # One entry per flag, each with its default: a flag's help is never just its key name.
    assert text.count("(default:") == len(flags_listed(text))


def test_the_converters_help_lists_data_decoding_and_its_own_flags(capsys):
    text = help_of(convert_job.parse_args, capsys)
    for group in ("data:", "decoding:", "conversion:"):
        assert f"\n{group}\n" in text
    for group in ("classify:", "Ray:", "output:"):
        assert f"\n{group}\n" not in text
    listed = flags_listed(text)
    assert {"--data", "--classes", "--shard-size", "--chunk-dir", "--to", "--dest", "--workers"} <= listed
    assert not {"--metrics", "--device", "--ray-address", "--max-in-flight", "--out", "--on-bad-file",
                "--verify-chunks"} & listed
    assert "--to {parquet,webdataset,idx}" in flat(text)
    assert "(default: all)" in flat(text)  # --classes: every class, the converter's own default
    assert "images per output file; 0: 8192, fewer where" in flat(text) and "16 MiB decoded (default: 0)" in flat(text)


def test_the_converter_still_accepts_the_flags_it_does_not_list(tmp_path):
    cfg, args = convert_job.parse_args(["--to", "idx", "--dest", str(tmp_path / "d"), "--metrics", "l1",
                                        "--ray-address", "local", "--on-bad-file", "skip"])
    assert (cfg.metrics, cfg.ray_address, cfg.on_bad_file, args.to) == (["l1"], "local", "skip", "idx")


def test_the_converters_classes_default_to_all_unless_a_file_or_flag_says(tmp_path):
    dest = ["--to", "parquet", "--dest", str(tmp_path / "d")]
    assert convert_job.parse_args(dest)[0].classes == ["all"]
    path = tmp_path / "c.toml"
    path.write_text('classes = ["3", "7"]\n')
    assert convert_job.parse_args([*dest, "--config", str(path)])[0].classes == ["3", "7"]
    assert convert_job.parse_args([*dest, "--config", str(path), "--classes", "1", "2"])[0].classes == ["1", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--to", "parquet"], "the following arguments are required: --dest"),
    (["--to", "zip", "--dest", "d"], "argument --to: invalid choice: 'zip'"),
    (["--to", "idx", "--dest", "d", "--shard-size", "-1"], "shard_size: expected a positive number of images or 0 (auto), got -1"),
])
def test_the_converter_rejects_bad_flags_with_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        convert_job.parse_args(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err

