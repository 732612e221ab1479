"""End to end: the whole DAG through kfp.local (what `mixgrpo run-local` runs) against a REAL S3
server (SeaweedFS) and a REAL MLflow server, twice: the first run's version becomes champion
through the gate; the second, held to an impossible margin, stays challenger.

Kept short for a 2-core machine: a tiny random toy model (published to S3 and used as model_uri,
so the base model also comes from the bucket), 1 iteration, 2 images per group, 6 steps, 2
held-out prompts. About 3-5 minutes; the component subprocesses dominate.
"""

import uuid
from pathlib import Path

import pytest

from services import MLflowServer, S3Endpoint  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]


def test_local_pipeline_against_real_s3_and_mlflow(s3_server: S3Endpoint, mlflow_server: MLflowServer,
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import boto3
    import torch

    from mixgrpo.registry import CHALLENGER, CHAMPION
    from mixgrpo.storage import publish_dir
    from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model
    from mixgrpo_pipelines.pipelines.local import run_local, summary

    for key, value in s3_server.env().items():  # the component subprocesses inherit these
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    store = f"s3://{s3_server.bucket}/{prefix}"
    torch.manual_seed(0)
    tiny = ToyFlowModel(ToyModelConfig(num_layers=1, num_single_layers=1, num_attention_heads=1, attention_head_dim=32))
    publish_dir(save_toy_model(tiny, tmp_path / "tiny"), f"{store}/models/tiny-toy")
    model_name = f"mixgrpo-e2e-{prefix}"
    params = dict(model_uri=f"{store}/models/tiny-toy", rewards="toy_object_color,toy_background", iterations=1,
                  group_size=2, prompts_per_iteration=1, train_batch_size=2, eval_images_per_prompt=1,
                  eval_max_prompts=2, extra_overrides="sampling.num_steps=6\nwindow.size=2",
                  mlflow_model_name=model_name)

    first = run_local(store, mlflow_server.uri, local_dir=tmp_path / "local", gpus_per_node=2,  # make run's DDP + EMA
                      **{**params, "extra_overrides": params["extra_overrides"] + "\noptim.ema_decay=0.5"})
    print(summary(first))

    # the weights are really in the bucket, under the run's prefix, complete (manifest last)
    assert first.weights_uri.startswith(f"{store}/runs/") and first.weights_uri.endswith("/train/final")
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key_id,
                      aws_secret_access_key=s3_server.secret_access_key, region_name=s3_server.region)
    key_prefix = first.weights_uri.removeprefix(f"s3://{s3_server.bucket}/") + "/"
    keys = {o["Key"].removeprefix(key_prefix)
            for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=key_prefix)["Contents"]}
    assert {"MANIFEST.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"} <= keys

    # the version is really in the registry: source = the weights URI, tags, and the gate made it champion
    client = mlflow_server.client()
    v1 = client.get_model_version(model_name, "1")
    assert v1.source == first.weights_uri and first.model_version == "1"
    assert {"pipeline_run_id", "config_hash", "dataset_manifest_hash", "git_sha", "weights_uri", "mode", "iterations",
            "learning_rate", "base_model", "metric.reward_normalized_mean"} <= set(v1.tags)
    assert [k for k in v1.tags if k.startswith("metric.")] == ["metric.reward_normalized_mean"]  # provenance, not metrics
    assert set(v1.aliases) == {CHAMPION, CHALLENGER} and first.champion == "1"
    assert client.get_run(v1.run_id).data.metrics["eval/reward_normalized_mean"] == pytest.approx(
        first.metrics["combined"]["tuned"])
    # the training logged into the same run while it ran: one point per iteration, the config as params
    assert [m.step for m in client.get_metric_history(v1.run_id, "train/reward/toy_object_color")] == [1]
    assert client.get_run(v1.run_id).data.params["max_iterations"] == "1"
    assert client.get_run(v1.run_id).data.params["distributed/engine"] == "ddp"   # two processes trained it
    assert client.get_run(v1.run_id).data.params["optim/ema_decay"] == "0.5"
    assert (first.report_dir / "grid.png").is_file() and "base" in (first.report_dir / "report.md").read_text()

    # a second run that cannot beat the champion by the margin: registered, challenger, champion unmoved
    second = run_local(store, mlflow_server.uri, local_dir=tmp_path / "local", gate_margin=100.0, **params)
    assert second.model_version == "2" and second.aliases == [CHALLENGER]
    assert client.get_registered_model(model_name).aliases[CHAMPION] == "1"
    assert second.weights_uri != first.weights_uri
    assert "demoted_by" not in client.get_model_version(model_name, "1").tags
