"""The MixGRPO DAG: prepare-prompts + cache-rewards -> train -> evaluate -> register -> gate -> [if] promote.

Heavy data moves by object-store URI (string parameters); small outputs are KFP artifacts the UI
renders (validation report, metrics, HTML / Markdown report with the image grid). Compile with
``mixgrpo pipeline compile`` (the committed ``pipelines/mixgrpo_pipeline.yaml``), run locally with
``mixgrpo run-local``, on a cluster with ``mixgrpo pipeline submit``.
"""

from typing import NamedTuple

from kfp import dsl, kubernetes

from mixgrpo_pipelines.components import cache_rewards, evaluate, gate, hash_prompts, prepare_prompts, promote, register, train
from mixgrpo_pipelines.pipelines.parameters import config_defaults

PIPELINE_NAME = "mixgrpo"
S3_SECRET = "mixgrpo-s3"  # = mixgrpo.trainjob.S3_SECRET (manifests/secrets/s3.template.yaml)
MLFLOW_SECRET = "mixgrpo-mlflow"  # = mixgrpo.trainjob.MLFLOW_SECRET
LAUNCHER_SERVICE_ACCOUNT = "mixgrpo-launcher"  # set on the run by `mixgrpo pipeline submit` (see README)
CONFIG = config_defaults()  # the training parameters' defaults are the config's (parameters.CONFIG_KEYS)
S3_RETRY = dict(num_retries=3, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="600s")


def _secret_env(task: dsl.PipelineTask, s3: bool = True, mlflow: bool = False) -> dsl.PipelineTask:
    """Credentials from the Kubernetes secrets (never from parameters), as mixgrpo.trainjob.DEFAULT_SECRET_ENV."""
    if s3:
        kubernetes.use_secret_as_env(task, S3_SECRET, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                        "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
        kubernetes.use_secret_as_env(task, S3_SECRET, {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
                                                        "AWS_REGION": "AWS_REGION"}, optional=True)
    if mlflow:
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                                            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
                                     optional=True)
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="MixGRPO: GRPO alignment of a flow-matching text-to-image model with a "
              "sliding window of SDE steps; prepare prompts, cache rewards, train, evaluate, register in MLflow, "
              "promote behind a gate.")
def mixgrpo_pipeline(
    model_uri: str = CONFIG["model_uri"],
    model_kind: str = CONFIG["model_kind"],
    prompt_uri: str = "",
    prompt_column: str = "",
    test_fraction: float = 0.2,
    min_prompts: int = 16,
    rewards: str = CONFIG["rewards"],
    reward_weights: str = CONFIG["reward_weights"],
    held_out_rewards: str = CONFIG["held_out_rewards"],
    reward_weight_sources: str = "",
    mode: str = CONFIG["mode"],
    window_size: int = CONFIG["window_size"],
    window_shift_interval: int = CONFIG["window_shift_interval"],
    window_strategy: str = CONFIG["window_strategy"],
    iterations: int = CONFIG["iterations"],
    group_size: int = CONFIG["group_size"],
    prompts_per_iteration: int = CONFIG["prompts_per_iteration"],
    train_batch_size: int = CONFIG["train_batch_size"],
    learning_rate: float = CONFIG["learning_rate"],
    seed: int = CONFIG["seed"],
    executor: str = "local",
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    engine: str = CONFIG["engine"],
    extra_overrides: str = "",
    train_namespace: str = "",
    kueue_queue: str = "",
    train_timeout_hours: float = 72.0,
    eval_images_per_prompt: int = CONFIG["eval_images_per_prompt"],
    eval_max_prompts: int = 0,
    eval_gpus: int = 1,
    mlflow_model_name: str = "mixgrpo-dit",
    mlflow_experiment: str = CONFIG["mlflow_experiment"],
    gate_metric: str = "reward_normalized_mean",
    gate_margin: float = 0.0,
    object_store_uri: str = "s3://mixgrpo",
    mlflow_tracking_uri: str = "",
    git_sha: str = "",
) -> NamedTuple("Outputs", weights_uri=str, model_version=str, eval_uri=str):
    """MixGRPO training pipeline.

    The training parameters' defaults are the training config's (`mixgrpo config`); one left at its
    default lets the mode's preset set its key (e.g. mixgrpo-flash: window_shift_interval 20).

    Args:
        model_uri: Base model: "" = the built-in toy model; else a diffusers FLUX directory or its s3:// prefix.
        model_kind: toy or flux (the model adapter).
        prompt_uri: Prompt file (txt / csv / jsonl / json / parquet) at s3://, file:// or a path; "" = the toy world's prompts.
        prompt_column: Prompt column of csv / jsonl / parquet; "" = the first of prompt, caption, text.
        test_fraction: Share of prompts held out for evaluation.
        min_prompts: Fewer prompts after cleaning fail the validation.
        rewards: Optimised rewards, comma-separated (hps, pickscore, imagereward, clip, unified, toy_*).
        reward_weights: Weight per reward as name=weight pairs; "" = equal weights.
        held_out_rewards: Rewards measured but never optimised (reward-hacking check), comma-separated.
        reward_weight_sources: Where weighted rewards' files are, name=URI pairs (cached once under OBJECT_STORE/rewards).
        mode: mixgrpo, mixgrpo-flash, mixgrpo-flash-star, dancegrpo or all-sde.
        window_size: SDE steps in the sliding window.
        window_shift_interval: Iterations before the window moves by one step.
        window_strategy: progressive, random, frozen, linear_decay, exp_decay or all.
        iterations: Training iterations.
        group_size: Images per prompt, normalised together (GRPO group).
        prompts_per_iteration: Prompts per iteration per process.
        train_batch_size: Trajectories per forward / backward micro-batch.
        learning_rate: AdamW learning rate.
        seed: Seed of training and of the prompt split.
        executor: local (in the step's pod / on this machine) or kubernetes (a Kubeflow Trainer TrainJob).
        num_nodes: Nodes of the TrainJob (executor=kubernetes).
        gpus_per_node: GPUs (processes) per node; locally more than 1 runs torchrun.
        engine: Distributed engine: none, ddp, fsdp or deepspeed.
        extra_overrides: More training config overrides, section.key=value, one per line.
        train_namespace: Namespace of the TrainJob; "" = the pipeline's.
        kueue_queue: Kueue LocalQueue for the TrainJob; "" = none.
        train_timeout_hours: The TrainJob is stopped (and the step fails) after this long.
        eval_images_per_prompt: Seeds per held-out prompt in the evaluation (at least 4 for a per-prompt spread).
        eval_max_prompts: Evaluate at most this many held-out prompts; 0 = all.
        eval_gpus: GPUs of the evaluate step on a cluster.
        mlflow_model_name: Registered model name in MLflow.
        mlflow_experiment: MLflow experiment of the training run.
        gate_metric: Evaluation metric the promotion gate compares (default: mean of the optimised rewards, tuned).
        gate_margin: The candidate must beat the champion's gate metric by more than this.
        object_store_uri: Object-store root (s3://BUCKET[/PREFIX]) for prompts, reward weights, checkpoints, weights, reports.
        mlflow_tracking_uri: MLflow tracking server; "" = MLFLOW_TRACKING_URI from the mixgrpo-mlflow secret.
        git_sha: Commit of the code, tagged on the model version; "" = the image's commit.
    """
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

    hashed = hash_prompts(prompt_uri=prompt_uri)
    hashed.set_display_name("Hash the prompt source").set_caching_options(False).set_retry(**S3_RETRY)
    _secret_env(hashed)

    # Cached on the source's content hash and the settings (its output prefix is named by them too).
    prepared = prepare_prompts(
        prompt_uri=prompt_uri, object_store_uri=object_store_uri, source_hash=hashed.output, column=prompt_column,
        test_fraction=test_fraction, min_prompts=min_prompts, seed=seed, model_uri=model_uri, model_kind=model_kind)
    prepared.set_display_name("Prepare prompts").set_retry(**S3_RETRY)
    _secret_env(prepared)

    cached = cache_rewards(rewards=rewards, held_out_rewards=held_out_rewards,
                           reward_weight_sources=reward_weight_sources, object_store_uri=object_store_uri)
    cached.set_display_name("Cache reward weights").set_retry(**S3_RETRY)
    _secret_env(cached)

    trained = train(
        prompts_uri=prepared.outputs["prompts_uri"], reward_options=cached.output, object_store_uri=object_store_uri,
        pipeline_run_id=run_id, model_uri=model_uri, model_kind=model_kind, mode=mode, rewards=rewards,
        reward_weights=reward_weights, held_out_rewards=held_out_rewards, iterations=iterations,
        group_size=group_size, prompts_per_iteration=prompts_per_iteration, train_batch_size=train_batch_size,
        learning_rate=learning_rate, window_size=window_size, window_shift_interval=window_shift_interval,
        window_strategy=window_strategy, seed=seed, executor=executor, num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, engine=engine, extra_overrides=extra_overrides,
        train_namespace=train_namespace, kueue_queue=kueue_queue, train_timeout_hours=train_timeout_hours,
        mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment, git_sha=git_sha)
    # No cache: the key cannot see new data behind the same URIs. One retry resumes from the last checkpoint.
    trained.set_display_name("Train (MixGRPO)").set_caching_options(False).set_retry(num_retries=1)
    _secret_env(trained, mlflow=True)

    evaluated = evaluate(
        config_json=trained.outputs["config_json"], weights_uri=trained.outputs["weights_uri"],
        prompts_uri=prepared.outputs["prompts_uri"], metrics_uri=trained.outputs["metrics_uri"],
        object_store_uri=object_store_uri, pipeline_run_id=run_id, images_per_prompt=eval_images_per_prompt,
        max_prompts=eval_max_prompts)
    evaluated.set_display_name("Evaluate base vs tuned").set_caching_options(False).set_retry(**S3_RETRY)
    evaluated.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(eval_gpus)
    _secret_env(evaluated)

    registered = register(
        weights_uri=trained.outputs["weights_uri"], metrics_json=evaluated.outputs["metrics_json"],
        eval_uri=evaluated.outputs["eval_uri"], metrics_uri=trained.outputs["metrics_uri"],
        config_json=trained.outputs["config_json"], config_hash=trained.outputs["config_hash"],
        dataset_hash=prepared.outputs["dataset_hash"], pipeline_run_id=run_id,
        mlflow_tracking_uri=mlflow_tracking_uri, model_name=mlflow_model_name, experiment=mlflow_experiment,
        git_sha=git_sha, gate_metric=gate_metric, mlflow_run_id=trained.outputs["mlflow_run_id"])
    registered.set_display_name("Register in MLflow").set_caching_options(False).set_retry(**S3_RETRY)
    _secret_env(registered, mlflow=True)

    gated = gate(version=registered.outputs["version"], mlflow_tracking_uri=mlflow_tracking_uri,
                 model_name=mlflow_model_name, gate_metric=gate_metric, gate_margin=gate_margin)
    gated.set_display_name("Promotion gate").set_caching_options(False).set_retry(**S3_RETRY)
    _secret_env(gated, s3=False, mlflow=True)

    with dsl.If(gated.output == True, name="beats-champion"):  # noqa: E712 - a KFP condition, not Python
        promoted = promote(version=registered.outputs["version"], mlflow_tracking_uri=mlflow_tracking_uri,
                           model_name=mlflow_model_name, gate_metric=gate_metric, gate_margin=gate_margin)
        promoted.set_display_name("Promote to champion").set_caching_options(False).set_retry(**S3_RETRY)
        _secret_env(promoted, s3=False, mlflow=True)

    outputs = NamedTuple("Outputs", weights_uri=str, model_version=str, eval_uri=str)
    return outputs(trained.outputs["weights_uri"], registered.outputs["version"], evaluated.outputs["eval_uri"])
