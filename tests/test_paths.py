from pathlib import Path

from mnist37.paths import cache_home, class_folder, is_uri, sample_path


def test_cache_home_follows_config_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST37_CACHE", str(tmp_path / "mine"))
    assert cache_home() == tmp_path / "mine"
    assert cache_home(tmp_path / "given") == tmp_path / "given"  # the config's cache_dir wins
    monkeypatch.delenv("MNIST37_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "mnist37"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_home("") == Path.home() / ".cache" / "mnist37"


def test_uris_and_paths():
    assert is_uri("s3://bucket/x") and is_uri("file:///tmp/x")
    assert not is_uri("/tmp/x") and not is_uri(Path("relative/dir"))


def test_sample_paths_are_slash_separated():
    assert class_folder("train", "3") == "train/3"
    assert sample_path("valid", "7", "a b.png") == "valid/7/a b.png"
