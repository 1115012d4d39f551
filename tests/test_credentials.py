"""No credential leaves through a URI: the real job, given a location that holds one (user info,
or a secret-like query parameter) by flag or config file, refuses it in one line (a config
error: exit 2) that never repeats it; no output of the run (stdout, stderr with its log lines,
any file written under the run's folder or cache) holds it. Credentials given the documented
way, in the environment, reach no output either, of a run that ends well or of one refused."""

from pathlib import Path

import pytest

from tests.conftest import make_image_folder
from tests.test_evaluate_job import run_job
from tests.test_paths import KEY, SECRET


def every_file_holding(root: Path, *words: str) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and any(w.encode() in p.read_bytes() for w in words)]


@pytest.mark.parametrize("key, location, part", [
    ("data", f"s3://{KEY}:{SECRET}@bucket/mnist_sample.tgz", "user info"),
    ("out", f"s3://bucket/runs/x?access_key={KEY}&secret_key={SECRET}", "query parameter 'access_key'"),
    ("chunk_dir", f"gs://{SECRET}@bucket/chunks", "user info"),
    ("out", f"https://host/runs?X-Amz-Credential={KEY}&X-Amz-Signature={SECRET}", "query parameter 'X-Amz-Credential'"),
    ("cache_dir", f"s3://bucket/cache?session_token={SECRET}", "query parameter 'session_token'"),
])
@pytest.mark.parametrize("given_by", ["flag", "config file"])
def test_a_location_with_a_credential_is_refused_without_repeating_it(mnist_sample_tgz, tmp_path, key, location,
                                                                       part, given_by):
    run_dir = tmp_path / "run"
    values = {"data": str(mnist_sample_tgz), "out": str(run_dir / "out"), "cache_dir": str(run_dir / "cache"),
              "chunk_dir": str(run_dir / "chunks"), key: location}
    if given_by == "flag":
        args = [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", v)]
    else:
        config = tmp_path / "job.toml"
        config.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
        args = ["--config", str(config)]
    run = run_job(*args, "--ray-address", "local", timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.rstrip().splitlines()[-1] == (
        f"evaluate.py: error: {key}: a location may not hold a credential (its {part} is refused, not shown); give "
        "credentials through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws) instead")
    for word in (SECRET, KEY):
        assert word not in run.stdout and word not in run.stderr
    assert not run_dir.exists() or every_file_holding(run_dir, SECRET, KEY) == []
    assert not (run_dir / "out" / "results.json").exists()


def test_a_mirror_url_with_a_credential_is_refused_without_repeating_it(tmp_path):
    run = run_job("--data", "mnist_tiny", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                  "--ray-address", "local", timeout=120,
                  env_extra={"MNIST37_URL_BASE": f"https://{KEY}:{SECRET}@mirror.example/fastai"})
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.rstrip().splitlines()[-1] == (
        "error: MNIST37_URL_BASE: a mirror's URL may not hold a credential (its user info is refused, not shown)")
    for word in (SECRET, KEY):
        assert word not in run.stdout and word not in run.stderr
    assert every_file_holding(tmp_path, SECRET, KEY) == []


@pytest.mark.ray
def test_credentials_from_the_environment_appear_in_no_output(tmp_path):
    """The other way a credential reaches the job, the environment, as documented: a whole run
    reading and writing a real S3 server (moto on 127.0.0.1) with the key and secret in the
    driver's environment (and so in its own Ray's workers'), then a run refused by the store;
    neither output, file, chunk nor object written holds them."""
    from tests.s3server import aws_env, serving

    bucket = "mnist37-credentials"
    data = make_image_folder(tmp_path / "sample", {"train": {"3": 6, "7": 5}, "valid": {"3": 3, "7": 4}})
    with serving(bucket) as server:
        server.upload(data, bucket, "sample")
        env = {**aws_env(server.endpoint), "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
        run_dir = tmp_path / "run"
        ran = run_job("--data", f"s3://{bucket}/sample", "--out", f"s3://{bucket}/runs/x", "--cache-dir",
                      str(run_dir / "cache"), "--chunk-dir", str(run_dir / "chunks"), "--ray-address", "local",
                      env_extra=env)
        assert ran.returncode == 0, ran.stderr[-2000:]
        refused = run_job("--data", f"s3://{bucket}-missing/sample", "--out", str(run_dir / "out"), "--cache-dir",
                          str(run_dir / "cache"), "--ray-address", "local", env_extra=env, timeout=120)
        assert refused.returncode == 1 and f"s3://{bucket}-missing" in refused.stderr
        client = server.client()
        written = {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                   for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]}
    assert "runs/x/results.json" in written and len(list((run_dir / "chunks").rglob("*.arrow"))) > 0
    for word in (SECRET, KEY):
        for run in (ran, refused):
            assert word not in run.stdout and word not in run.stderr
        assert not [key for key, body in written.items() if word.encode() in body]
    assert every_file_holding(run_dir, SECRET, KEY) == []
