import logging
from pathlib import Path

import pytest

from mnist37.config import LOCATIONS, ConfigError, load
from mnist37.storage.locations import LocationError, cache_home, class_folder, is_uri, open_location, sample_path, secret_part


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


# A credential-like pair no other part of a run could make up.
KEY, SECRET = "AKIAMNIST37EXAMPLE", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYmnist37secret"


@pytest.mark.parametrize("location, part", [
    (f"s3://{KEY}:{SECRET}@bucket/x", "user info"),
    (f"gs://{SECRET}@bucket/x", "user info"),
    (f"https://{KEY}:{SECRET}@[::1]:9/x", "user info"),
    (f"s3://bucket/x?region=us-east-1&access_key={KEY}&secret_key={SECRET}", "query parameter 'access_key'"),
    (f"s3://bucket/x?secret_key={SECRET}", "query parameter 'secret_key'"),
    (f"s3://bucket/x?session_token={SECRET}", "query parameter 'session_token'"),
    (f"https://host/x.tgz?X-Amz-Credential={KEY}&X-Amz-Signature={SECRET}", "query parameter 'X-Amz-Credential'"),
    (f"https://host/x.tgz?X-Goog-Signature={SECRET}", "query parameter 'X-Goog-Signature'"),
    (f"https://acct.blob.core.windows.net/c/x?sv=2022&sig={SECRET}", "query parameter 'sig'"),
    (f"hdfs://host/x?password={SECRET}", "query parameter 'password'"),
    (f"s3://bucket/x?Token={SECRET}", "query parameter 'Token'"),
])
def test_a_credential_in_a_uri_is_named_by_its_part_never_shown(location, part):
    assert secret_part(location) == part
    assert SECRET not in part and KEY not in part
    with pytest.raises(LocationError) as refused:
        open_location(location)
    assert str(refused.value) == (f"a location with a credential in its {part} is refused (not shown); give credentials "
                                  "through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws)")


@pytest.mark.parametrize("location", [
    "/tmp/a@b/x", "runs/latest", "s3://bucket/runs/x@y", "s3://bucket/x?endpoint_override=127.0.0.1:9000&region=r",
    "s3://bucket/x?scheme=http&force_virtual_addressing=false", "file:///tmp/x", "s3://bucket/x#@frag",
])
def test_locations_without_credentials_pass_the_gate(location):
    assert secret_part(location) is None


def test_the_config_refuses_a_credential_in_every_location_key_and_logs_nothing(caplog):
    caplog.set_level(logging.DEBUG)
    for key in LOCATIONS:
        with pytest.raises(ConfigError) as refused:
            load(None, **{key: f"s3://{KEY}:{SECRET}@bucket/x"})
        assert str(refused.value).startswith(f"{key}: a location may not hold a credential (its user info is "
                                             "refused, not shown); give credentials through the environment")
        assert SECRET not in str(refused.value) and KEY not in str(refused.value)
    assert SECRET not in caplog.text and KEY not in caplog.text
