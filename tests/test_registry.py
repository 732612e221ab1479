"""mixgrpo.registry against a real MLflow server (artifacts in a real S3 server) and a local sqlite store."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixgrpo.registry import (
    CHALLENGER,
    CHAMPION,
    PromotionDecision,
    RegistryError,
    RegistrySettings,
    alias_version,
    decide_promotion,
    log_training_run,
    promote,
    register_model,
)
from services import MLflowServer, S3Endpoint, free_ports

GATE = "reward_normalized_mean"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(client, name: str, run: str, value: float, bucket: str = "mixgrpo-test", **extra):  # noqa: ANN001, ANN201
    """Register weights of pipeline run ``run`` with gate metric ``value``."""
    return register_model(client, name, f"s3://{bucket}/runs/{run}/weights", pipeline_run_id=run,
                          metrics={GATE: value, "hps": value / 2}, **extra)


@pytest.fixture
def client(mlflow_server: MLflowServer, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    return RegistrySettings(tracking_uri=mlflow_server.uri).connect()


# --------------------------------------------------------------------------- settings


def test_settings_from_env_and_token_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    embedded = RegistrySettings.from_env({})
    assert embedded.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert embedded.artifact_location == (tmp_path / "mlflow-artifacts").as_uri()
    assert embedded.model_name == "mixgrpo-dit"
    remote = RegistrySettings.from_env({"MLFLOW_TRACKING_URI": "https://mlflow.example.com",
                                        "MLFLOW_TRACKING_TOKEN": "s3cret", "MIXGRPO_MODEL_NAME": "flux-grpo"})
    assert (remote.tracking_uri, remote.model_name, remote.token) == ("https://mlflow.example.com", "flux-grpo",
                                                                      "s3cret")
    assert "s3cret" not in repr(remote)
    with pytest.raises(RegistryError, match=r"refusing to send an MLflow token over plain http to "
                                             r"http://mlflow\.example\.com:5000"):
        RegistrySettings.from_env({"MLFLOW_TRACKING_URI": "http://mlflow.example.com:5000",
                                   "MLFLOW_TRACKING_TOKEN": "s3cret"})
    for loopback in ("http://127.0.0.1:5000", "http://localhost:5000", "http://[::1]:5000"):
        assert RegistrySettings(tracking_uri=loopback, token="t").token == "t"
    assert RegistrySettings(tracking_uri="http://mlflow.example.com:5000").token is None  # no token: allowed
    with pytest.raises(RegistryError, match=r"'ftp://x' is not supported"):
        RegistrySettings(tracking_uri="ftp://x")


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{free_ports(1)[0]}"
    start = time.monotonic()
    with pytest.raises(RegistryError, match=rf"MLflow tracking server {uri} is unreachable .*nothing was registered"):
        RegistrySettings(tracking_uri=uri).connect()
    from mlflow import MlflowClient

    with pytest.raises(RegistryError, match=rf"{uri} is unreachable"):  # a client made elsewhere: same check
        register_model(MlflowClient(uri, uri), "m", "s3://b/w", pipeline_run_id="run-1", metrics={GATE: 1.0})
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------- server: register


@pytest.mark.integration
def test_register_creates_a_version_pointing_at_the_weights(
    client, mlflow_server: MLflowServer  # noqa: ANN001
) -> None:
    name = unique("reg")
    version = register_model(
        client, name, "s3://mixgrpo-test/runs/kfp-1/weights", pipeline_run_id="kfp-1", git_sha="0123abc",
        config_hash="cfg42", dataset_hash="data99", metrics={GATE: 0.25, "hps": 0.31, "pickscore": 21.5},
        tags={"mode": "mixgrpo"},
    )
    assert version.version == "1" and version.source == "s3://mixgrpo-test/runs/kfp-1/weights"
    assert version.aliases == [CHALLENGER]
    assert version.tags == {
        "pipeline_run_id": "kfp-1", "weights_uri": "s3://mixgrpo-test/runs/kfp-1/weights", "git_sha": "0123abc",
        "config_hash": "cfg42", "dataset_manifest_hash": "data99", "metric.reward_normalized_mean": "0.25",
        "metric.hps": "0.31", "metric.pickscore": "21.5", "mode": "mixgrpo",
    }
    fresh = mlflow_server.client().get_model_version_by_alias(name, CHALLENGER)  # seen by another client
    assert fresh.version == "1" and fresh.source == version.source
    assert mlflow_server.client().get_model_version(name, "1").current_stage == "None"  # no stages


@pytest.mark.integration
def test_retry_with_the_same_pipeline_run_is_idempotent(client) -> None:  # noqa: ANN001
    name = unique("retry")
    first = register(client, name, "kfp-a", 0.1)
    again = register(client, name, "kfp-a", 0.1)
    assert again.version == first.version == "1"
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    second = register(client, name, "kfp-b", 0.2)
    assert second.version == "2" and alias_version(client, name, CHALLENGER) == "2"
    again_a = register(client, name, "kfp-a", 0.1)  # a late retry of run a re-points challenger at its version
    assert again_a.version == "1" and alias_version(client, name, CHALLENGER) == "1"
    with pytest.raises(RegistryError, match=r"pipeline run kfp-a already registered .* version 1 with source "
                                             r"s3://mixgrpo-test/runs/kfp-a/weights, not s3://elsewhere/w"):
        register_model(client, name, "s3://elsewhere/w", pipeline_run_id="kfp-a")
    assert len(client.search_model_versions(f"name='{name}'")) == 2


@pytest.mark.integration
def test_bad_inputs_register_nothing(client) -> None:  # noqa: ANN001
    name = unique("bad")
    with pytest.raises(RegistryError, match=r"weights URI '/tmp/w' is not an object-store URI"):
        register_model(client, name, "/tmp/w", pipeline_run_id="kfp-1")
    with pytest.raises(RegistryError, match=r"metric 'hps' is 'high'; expected a number"):
        bad_metrics: dict = {"hps": "high"}
        register_model(client, name, "s3://b/w", pipeline_run_id="kfp-1", metrics=bad_metrics)
    with pytest.raises(RegistryError, match=r"pipeline run id \"it's\""):
        register_model(client, name, "s3://b/w", pipeline_run_id="it's")
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="not found|RESOURCE_DOES_NOT_EXIST"):
        client.get_registered_model(name)


# --------------------------------------------------------------------------- server: promotion


@pytest.mark.integration
def test_first_version_is_promoted_when_there_is_no_champion(client) -> None:  # noqa: ANN001
    name = unique("first")
    version = register(client, name, "kfp-1", 0.1)
    decision = decide_promotion(client, name, version.version, GATE, margin=0.05)
    assert decision == PromotionDecision(True, "no champion yet", GATE, 0.05, "1", 0.1)
    promoted = promote(client, name, version.version, decision)
    assert sorted(promoted.aliases) == [CHALLENGER, CHAMPION] and "previous_champion" not in promoted.tags
    assert promote(client, name, version.version, decision).version == "1"  # a retried promote is a no-op
    assert decide_promotion(client, name, "1", GATE).promote is False  # already champion


@pytest.mark.integration
def test_better_by_the_margin_is_promoted_and_the_old_champion_tagged(client) -> None:  # noqa: ANN001
    name = unique("better")
    v1 = register(client, name, "kfp-1", 0.10)
    promote(client, name, v1.version, decide_promotion(client, name, v1.version, GATE))
    v2 = register(client, name, "kfp-2", 0.20)
    decision = decide_promotion(client, name, v2.version, GATE, margin=0.05)
    assert (decision.promote, decision.champion_version, decision.champion_value) == (True, "1", 0.10)
    assert "0.2 > champion v1's 0.1 + margin 0.05" in decision.reason
    new = promote(client, name, v2.version, decision)
    assert alias_version(client, name, CHAMPION) == "2" and new.tags["previous_champion"] == "1"
    assert new.tags["promotion_reason"] == decision.reason
    old = client.get_model_version(name, "1")
    assert old.tags["demoted_by"] == "2" and CHAMPION not in old.aliases
    assert all(v.current_stage == "None" for v in client.search_model_versions(f"name='{name}'"))


@pytest.mark.integration
def test_worse_or_within_margin_is_not_promoted(client) -> None:  # noqa: ANN001
    name = unique("worse")
    v1 = register(client, name, "kfp-1", 0.30)
    promote(client, name, v1.version, decide_promotion(client, name, v1.version, GATE))
    worse = register(client, name, "kfp-2", 0.20)
    close = register(client, name, "kfp-3", 0.33)
    no = decide_promotion(client, name, worse.version, GATE, margin=0.0)
    assert no.promote is False and "0.2 <= champion v1's 0.3" in no.reason
    assert decide_promotion(client, name, close.version, GATE, margin=0.05).promote is False
    assert decide_promotion(client, name, close.version, GATE, margin=0.01).promote is True
    with pytest.raises(RegistryError, match=r"not promoting .* version 2: the gate decided against it"):
        promote(client, name, worse.version, no)
    assert alias_version(client, name, CHAMPION) == "1"
    assert "demoted_by" not in client.get_model_version(name, "1").tags
    assert decide_promotion(client, name, "3", "hps", margin=0.0).promote is True  # another gate metric


@pytest.mark.integration
def test_gate_errors_name_the_fix(client) -> None:  # noqa: ANN001
    name = unique("gate")
    v1 = register(client, name, "kfp-1", 0.1)
    with pytest.raises(RegistryError, match=r"version 1 has no tag metric\.clip; its metrics: \['hps', "
                                             r"'reward_normalized_mean'\]"):
        decide_promotion(client, name, v1.version, "clip")
    stale = decide_promotion(client, name, v1.version, GATE)
    v2 = register(client, name, "kfp-2", 0.5)
    promote(client, name, v2.version, decide_promotion(client, name, v2.version, GATE))
    with pytest.raises(RegistryError, match=r"champion of .* moved to version 2 after the decision"):
        promote(client, name, v1.version, stale)
    with pytest.raises(RegistryError, match=r"decision is for .* version 1, not 2"):
        promote(client, name, "2", stale)


# --------------------------------------------------------------------------- server: runs


@pytest.mark.integration
def test_training_run_metrics_and_files_land_in_mlflow_and_s3(client, s3_server: S3Endpoint,  # noqa: ANN001
                                                              tmp_path: Path) -> None:
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "index.html").write_text("<img src='a.png'>")
    (grid / "a.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "curve.png").write_bytes(b"\x89PNG curve")
    experiment = unique("exp")
    run_id = log_training_run(
        client, experiment, pipeline_run_id="kfp-7", run_name="mixgrpo toy", params={"lr": 1e-5, "mode": "mixgrpo"},
        metrics={GATE: 0.4}, history={"reward": [0.1, 0.2, 0.3]},
        artifacts={"grid": grid, "plots": tmp_path / "curve.png"},
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "1e-05", "mode": "mixgrpo"}
    assert run.data.metrics[GATE] == 0.4 and run.data.tags["pipeline_run_id"] == "kfp-7"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "reward")] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["grid", "plots"]
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key_id,
                      aws_secret_access_key=s3_server.secret_access_key, region_name=s3_server.region)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="artifacts/")["Contents"]]
    assert any(k.endswith(f"{run_id}/artifacts/grid/index.html") for k in keys)
    assert any(k.endswith(f"{run_id}/artifacts/plots/curve.png") for k in keys)
    assert log_training_run(client, experiment, pipeline_run_id="kfp-7", metrics={GATE: 0.4}) == run_id  # retry
    with pytest.raises(RegistryError, match=r"artifact 'grid': local path .*missing does not exist"):
        log_training_run(client, experiment, pipeline_run_id="kfp-8", artifacts={"grid": tmp_path / "missing"})


# --------------------------------------------------------------------------- embedded default


@pytest.fixture(scope="module")
def sqlite_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistrySettings]:
    root = tmp_path_factory.mktemp("embedded")
    yield RegistrySettings.from_env({"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'db' / 'mlflow.db'}"})


def test_embedded_sqlite_store_registers_and_promotes(sqlite_settings: RegistrySettings, tmp_path: Path) -> None:
    client = sqlite_settings.connect()
    name = unique("local")
    weights = (tmp_path / "weights").as_uri()
    v1 = register_model(client, name, weights, pipeline_run_id="local-1", metrics={GATE: 0.1})
    assert v1.source == weights and v1.aliases == [CHALLENGER]
    assert str(register_model(client, name, weights, pipeline_run_id="local-1", metrics={GATE: 0.1}).version) == "1"
    promote(client, name, "1", decide_promotion(client, name, "1", GATE))
    v2 = register_model(client, name, (tmp_path / "w2").as_uri(), pipeline_run_id="local-2", metrics={GATE: 0.05})
    assert decide_promotion(client, name, v2.version, GATE).promote is False
    assert alias_version(client, name, CHAMPION) == "1" and alias_version(client, name, CHALLENGER) == "2"
    (tmp_path / "plot.png").write_bytes(b"png")
    run_id = log_training_run(client, "embedded", pipeline_run_id="local-1", metrics={GATE: 0.1},
                              artifacts={"plots": tmp_path / "plot.png"},
                              artifact_location=sqlite_settings.artifact_location)
    artifact_root = Path(sqlite_settings.artifact_location.removeprefix("file://"))  # type: ignore[union-attr]
    assert list(artifact_root.rglob("plot.png")) and run_id in str(next(artifact_root.rglob("plot.png")))


# --------------------------------------------------------------------------- lost responses, dead server (issue 13, item 2)


class LossyProxy:
    """A loopback HTTP proxy in front of an MLflow server. ``on_create(n)`` runs when the n-th (0-based)
    create-model-version request arrives and returns what to do: "forward", or "drop" (forward it, then
    close the connection without an answer: the response is lost, the version exists)."""

    def __init__(self, upstream: str, on_create):  # noqa: ANN001
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        target = urlparse(upstream)
        self.creates = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = "forward"
                if self.path.endswith("/model-versions/create"):
                    action = on_create(proxy.creates)
                    proxy.creates += 1
                try:
                    upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream_conn.request(self.command, self.path, body=body, headers=headers)
                    response = upstream_conn.getresponse()
                    payload = response.read()
                except OSError:
                    action = "drop"  # the server is gone: so is the answer
                if action == "drop":
                    self.close_connection = True
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward  # noqa: N815

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run_versions(client, name: str, run: str) -> list[str]:  # noqa: ANN001
    return sorted(v.version for v in client.search_model_versions(f"name='{name}' and tags.pipeline_run_id='{run}'"))


@pytest.mark.integration
def test_lost_create_response_gives_one_version_and_a_stable_challenger(mlflow_server: MLflowServer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    proxy = LossyProxy(mlflow_server.uri, lambda n: "drop" if n == 0 else "forward")
    try:
        name = unique("lost")
        version = register(MlflowClient(proxy.uri, proxy.uri), name, "kfp-lost", 0.3)
        assert proxy.creates >= 1
        direct = mlflow_server.client()
        assert run_versions(direct, name, "kfp-lost") == [version.version]          # no duplicate survives
        assert alias_version(direct, name, CHALLENGER) == version.version
        again = register(direct, name, "kfp-lost", 0.3)                             # the step is retried
        assert again.version == version.version and alias_version(direct, name, CHALLENGER) == version.version
    finally:
        proxy.close()


@pytest.mark.integration
def test_existing_duplicates_settle_on_the_challenger_without_moving_it(client) -> None:  # noqa: ANN001
    """What the old code left behind: v1 and v2 of one run, challenger on v2. A retry keeps v2."""
    name = unique("dup")
    register(client, name, "kfp-dup", 0.4)
    source = "s3://mixgrpo-test/runs/kfp-dup/weights"
    client.create_model_version(name, source, tags={"pipeline_run_id": "kfp-dup", "weights_uri": source})
    client.set_registered_model_alias(name, CHALLENGER, "2")
    settled = register(client, name, "kfp-dup", 0.4)
    assert settled.version == "2" and alias_version(client, name, CHALLENGER) == "2"
    assert run_versions(client, name, "kfp-dup") == ["2"]


@pytest.mark.integration
def test_mlflow_killed_mid_register_fails_fast_with_a_clear_error(s3_server: S3Endpoint, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)
    server = MLflowServer(tmp_path / "mlflow", s3_server, bucket=s3_server.bucket).start()

    def kill_server(n: int) -> str:
        server.stop()
        return "forward"

    proxy = LossyProxy(server.uri, kill_server)
    try:
        start = time.monotonic()
        with pytest.raises(RegistryError, match=rf"MLflow at {proxy.uri}: could not create a version of 'dead-"):
            register(MlflowClient(proxy.uri, proxy.uri), unique("dead"), "kfp-dead", 0.5)
        elapsed = time.monotonic() - start
        assert server.process is None and proxy.creates == 3          # 1 try + MLFLOW_HTTP_REQUEST_MAX_RETRIES=2
        print(f"register against an MLflow server killed mid-register failed after {elapsed:.1f} s")
        assert elapsed < 45, f"took {elapsed:.0f} s"
    finally:
        proxy.close()
        server.stop()
