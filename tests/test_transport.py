"""Secrets never travel over plain http to another host (issue 13, item 8): ``mixgrpo pipeline submit``'s
bearer token, MLflow's ``$MLFLOW_TRACKING_TOKEN`` in training, the UnifiedReward API key (in
test_rewards_unified.py). Listeners are real HTTP servers; the "remote" one listens on this machine's
non-loopback address."""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mixgrpo.cli import main  # noqa: E402
from mixgrpo.transport import InsecureTransportError, check_secret_transport, is_loopback  # noqa: E402


def non_loopback_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if is_loopback(address) else address


class Listener:
    """A plain-http server on ``address`` that records every request's path and Authorization header."""

    def __init__(self, address: str):
        self.seen: list[tuple[str, str | None]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                listener.seen.append((self.path, self.headers.get("Authorization")))
                body = b'{"error_code": "INTERNAL_ERROR", "message": "test listener"}'
                self.send_response(500)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://{address}:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def remote_listener():
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    listener = Listener(address)
    yield listener
    listener.close()


@pytest.fixture
def loopback_listener():
    listener = Listener("127.0.0.1")
    yield listener
    listener.close()


def test_transport_rule():
    for url in ("https://kfp.example.com", "http://127.0.0.1:8888", "http://localhost", "http://[::1]:80"):
        check_secret_transport(url, "the token")
    for url in ("http://kfp.example.com", "http://10.0.0.3:8888", "ftp://x"):
        with pytest.raises(InsecureTransportError, match="refusing to send the token"):
            check_secret_transport(url, "the token")


def test_submit_refuses_a_token_over_plain_http_to_another_host(remote_listener, monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "tok-123")
    assert main(["pipeline", "submit", "--host", remote_listener.url]) == 2
    assert "refusing to send the bearer token" in capsys.readouterr().err
    assert remote_listener.seen == [], "the token reached a plain-http listener"


def test_submit_reads_the_token_from_a_file_and_sends_it_to_loopback(loopback_listener, tmp_path, monkeypatch):
    from mixgrpo_pipelines.pipelines.cluster import client

    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.setattr("kfp.client.client.time.sleep", lambda seconds: None)  # kfp retries its healthz 5 times
    (tmp_path / "token").write_text("tok-from-file\n")
    with pytest.raises(TimeoutError):
        client(loopback_listener.url, token_file=str(tmp_path / "token"))  # the listener answers 500
    assert loopback_listener.seen and loopback_listener.seen[0][1] == "Bearer tok-from-file"


def test_token_on_the_command_line_is_deprecated(capsys, monkeypatch):
    from mixgrpo_pipelines.pipelines.cluster import read_token

    monkeypatch.delenv("KFP_TOKEN", raising=False)
    assert read_token("on-the-command-line") == "on-the-command-line"
    assert "--token is deprecated" in capsys.readouterr().err
    monkeypatch.setenv("KFP_TOKEN", "from-env")
    assert read_token() == "from-env"


def test_unreachable_host_is_one_clear_line_fast(capsys, monkeypatch):
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    start = time.monotonic()
    assert main(["pipeline", "submit", "--host", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 10
    assert f"cannot reach the Kubeflow Pipelines API at http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_training_refuses_mlflow_token_over_plain_http(remote_listener, tmp_path, monkeypatch):
    from mixgrpo.config import load_config
    from mixgrpo.tracking import MetricsLog

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-secret")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config(overrides={"mlflow_tracking_uri": remote_listener.url})
    with pytest.raises(InsecureTransportError, match=r"refusing to send \$MLFLOW_TRACKING_TOKEN"):
        MetricsLog(tmp_path / "metrics.jsonl", cfg)
    assert remote_listener.seen == []
