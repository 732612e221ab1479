"""register: an MLflow model version whose source is the weights URI, alias challenger."""

from typing import NamedTuple

from kfp import dsl

from mixgrpo_pipelines.components.container_images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def register(
    weights_uri: str,
    metrics_json: str,
    eval_uri: str,
    metrics_uri: str,
    config_json: str,
    config_hash: str,
    dataset_hash: str,
    pipeline_run_id: str,
    mlflow_tracking_uri: str,
    model_name: str,
    experiment: str,
    git_sha: str,
    gate_metric: str,
    mlflow_run_id: str,
) -> NamedTuple("Registered", version=str, mlflow_run_id=str):
    """Log the run (metrics, reward curves, grid, report) to MLflow and register the weights as a new version.

    Idempotent on the pipeline run id: a retried step reuses its MLflow run and model version.

    Args:
        weights_uri: The tuned weights (the version's source; nothing is copied).
        metrics_json: Evaluation metrics (logged to the run; the gate metric also tags the version).
        eval_uri: The published evaluation report (logged as artifacts).
        metrics_uri: The training metrics (reward curves).
        config_json: Training config overrides (logged as parameters).
        config_hash: Hash of the resolved training config (tag).
        dataset_hash: Hash of the prepared prompt data set (tag).
        pipeline_run_id: The KFP run id (tag; the idempotency key).
        mlflow_tracking_uri: MLflow tracking server; "" = $MLFLOW_TRACKING_URI (the mixgrpo-mlflow secret).
        model_name: Registered model name.
        experiment: MLflow experiment of the run.
        git_sha: Commit of the code (tag); "" = the image's commit.
        gate_metric: Metric the promotion gate compares (checked here: it must be an evaluation metric).
        mlflow_run_id: The MLflow run training logged into (evaluation attaches to it); "" = log a new run here.

    Returns:
        version: the model version (alias challenger); mlflow_run_id: the MLflow run with metrics, curves and report.
    """
    import json
    from collections import namedtuple

    from mixgrpo_pipelines.pipelines.steps import register_step

    out = register_step(
        tracking_uri=mlflow_tracking_uri, model_name=model_name, experiment=experiment, weights_uri=weights_uri,
        pipeline_run_id=pipeline_run_id, metrics=json.loads(metrics_json), eval_uri=eval_uri, metrics_uri=metrics_uri,
        git_sha=git_sha, config_hash=config_hash, dataset_hash=dataset_hash, params=json.loads(config_json),
        gate_metric=gate_metric, mlflow_run_id=mlflow_run_id)
    from mixgrpo.console import say

    say(f"registered {model_name} version {out.version} (aliases {list(out.aliases)}), MLflow run {out.mlflow_run_id}")
    outputs = namedtuple("Registered", ["version", "mlflow_run_id"])
    return outputs(out.version, out.mlflow_run_id)
