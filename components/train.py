"""train: MixGRPO training, in process / torchrun locally or as a Kubeflow Trainer TrainJob on a cluster."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Model, Output

from mixgrpo_pipelines.components.container_images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def train(
    prompts_uri: str,
    reward_options: str,
    object_store_uri: str,
    pipeline_run_id: str,
    tuned_model: Output[Model],
    model_uri: str,
    model_kind: str,
    mode: str,
    rewards: str,
    reward_weights: str,
    held_out_rewards: str,
    iterations: int,
    group_size: int,
    prompts_per_iteration: int,
    train_batch_size: int,
    learning_rate: float,
    window_size: int,
    window_shift_interval: int,
    window_strategy: str,
    seed: int,
    executor: str,
    num_nodes: int,
    gpus_per_node: int,
    engine: str,
    extra_overrides: str,
    train_namespace: str,
    kueue_queue: str,
    train_timeout_hours: float,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    git_sha: str,
) -> NamedTuple("Trained", weights_uri=str, metrics_uri=str, config_hash=str, config_json=str, mlflow_run_id=str):
    """Train the policy with MixGRPO; checkpoints and the final weights go to OBJECT_STORE/runs/RUN_ID/train.

    No defaults here: the pipeline passes every input (its defaults: mixgrpo_pipelines.pipelines.parameters).

    Args:
        prompts_uri: The prepared prompt data set.
        reward_options: rewards.options JSON from cache-rewards (cached weight URIs).
        object_store_uri: Object-store root.
        pipeline_run_id: The KFP run id.
        tuned_model: The tuned weights as a Model artifact whose URI is the published prefix (lineage in the UI).
        model_uri: Base model: "" = the built-in toy model; else a diffusers directory or s3:// prefix.
        model_kind: toy or flux.
        mode: mixgrpo, mixgrpo-flash, mixgrpo-flash-star, dancegrpo or all-sde.
        rewards: Optimised rewards, comma-separated.
        reward_weights: name=weight pairs; "" = equal weights.
        held_out_rewards: Measured, never optimised.
        iterations: Training iterations.
        group_size: Images per prompt (GRPO group).
        prompts_per_iteration: Prompts per iteration per process.
        train_batch_size: Trajectories per micro-batch.
        learning_rate: AdamW learning rate.
        window_size: SDE steps in the sliding window.
        window_shift_interval: Iterations before the window moves.
        window_strategy: progressive, random, frozen, linear_decay, exp_decay or all.
        seed: Training seed.
        executor: local (this pod / machine) or kubernetes (a Kubeflow Trainer TrainJob).
        num_nodes: Nodes of the TrainJob (local: 1).
        gpus_per_node: Processes (GPUs) per node; locally more than 1 runs torchrun.
        engine: none, ddp, fsdp or deepspeed.
        extra_overrides: More config overrides, section.key=value per line.
        train_namespace: TrainJob namespace; "" = the pod's own.
        kueue_queue: Kueue LocalQueue of the TrainJob; "" = none.
        train_timeout_hours: The TrainJob is stopped after this long.
        mlflow_tracking_uri: MLflow server the training logs into live; "" = $MLFLOW_TRACKING_URI (none: no live tracking).
        mlflow_experiment: MLflow experiment of the pipeline run's MLflow run.
        git_sha: Commit of the code (an MLflow param); "" = the image's commit.

    Returns:
        weights_uri: the tuned weights (transformer/ inside, MANIFEST.json); metrics_uri; config_hash; config_json;
        mlflow_run_id: the MLflow run training logged into ("" without tracking).
    """
    import json
    import tempfile
    from collections import namedtuple

    from mixgrpo_pipelines.pipelines.steps import RunLayout, train_overrides, train_step

    overrides = train_overrides(
        reward_options=json.loads(reward_options or "{}"), extra=extra_overrides, model_uri=model_uri,
        model_kind=model_kind, mode=mode, rewards=rewards, reward_weights=reward_weights,
        held_out_rewards=held_out_rewards, iterations=iterations, group_size=group_size,
        prompts_per_iteration=prompts_per_iteration, train_batch_size=train_batch_size, learning_rate=learning_rate,
        window_size=window_size, window_shift_interval=window_shift_interval, window_strategy=window_strategy,
        seed=seed, engine=engine, mlflow_experiment=mlflow_experiment)
    layout = RunLayout(object_store_uri, pipeline_run_id)
    with tempfile.TemporaryDirectory(prefix="mixgrpo-train-") as workdir:
        out = train_step(overrides, prompts_uri, layout, workdir, executor=executor, num_nodes=num_nodes,
                         procs_per_node=gpus_per_node,
                         kubernetes={"namespace": train_namespace, "queue": kueue_queue,
                                     "timeout_s": train_timeout_hours * 3600},
                         tracking_uri=mlflow_tracking_uri, experiment=mlflow_experiment, git_sha=git_sha)
    from mixgrpo.console import say

    say(f"{out.iterations} iterations, weights {out.weights_uri}"
        + (f", MLflow run {out.mlflow_run_id}" if out.mlflow_run_id else ""))
    tuned_model.uri = out.weights_uri
    tuned_model.metadata.update({"iterations": out.iterations, "config_hash": out.config_hash, "mode": mode,
                                 "mlflow_run_id": out.mlflow_run_id})
    outputs = namedtuple("Trained", ["weights_uri", "metrics_uri", "config_hash", "config_json", "mlflow_run_id"])
    return outputs(out.weights_uri, out.metrics_uri, out.config_hash, json.dumps(overrides), out.mlflow_run_id)
