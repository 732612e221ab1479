"""The pipeline's steps: what each KFP component calls (no kfp import here; the library never imports this).

Every step reads and writes the object store by URI (``s3://`` or ``file://``) under one run
prefix, laid out by :class:`RunLayout`::

    {root}/runs/{run_id}/prompts/         prepared prompt data set (MANIFEST.json last)
    {root}/runs/{run_id}/train/           checkpoints, and final/ = the tuned weights (transformer/)
    {root}/runs/{run_id}/train-metrics/   metrics.jsonl + config.yaml of the training run
    {root}/runs/{run_id}/train-job/       what a Kubernetes TrainJob's nodes read (config, prompts)
    {root}/runs/{run_id}/eval/            metrics.json, grid.png, report.md / .html, rewards.png
    {root}/rewards/{name}/{version}/      reward weights, cached once (shared across runs)

The steps are plain functions of strings and numbers, so the components stay thin and the tests
call exactly what the pipeline runs. Errors name the input that caused them and the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixgrpo.provenance import resolve_git_sha
from mixgrpo.selection import VALIDATION_COUNT

log = logging.getLogger(__name__)

GATE_METRIC = "reward_normalized_mean"  # = mixgrpo.registry.DEFAULT_GATE_METRIC: evaluate's combined (tuned)
EXECUTORS = ("local", "kubernetes")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StepError(ValueError):
    """A pipeline step got an input it cannot use; the message names the input and the fix."""


# --------------------------------------------------------------------------- layout and parsing


@dataclass(frozen=True)
class RunLayout:
    """Where one pipeline run's data lives under the object-store root."""

    root: str
    run_id: str

    def __post_init__(self) -> None:
        from urllib.parse import urlparse

        if urlparse(self.root).scheme not in ("s3", "file"):
            raise StepError(f"object_store_uri {self.root!r}: use s3://BUCKET[/PREFIX] or file:///ABSOLUTE/DIR")
        if not _RUN_ID.fullmatch(self.run_id):
            raise StepError(f"pipeline run id {self.run_id!r}: use letters, digits, '.', '_' and '-'")

    @property
    def run(self) -> str:
        return f"{self.root.rstrip('/')}/runs/{self.run_id}"

    prompts = property(lambda self: f"{self.run}/prompts")
    train = property(lambda self: f"{self.run}/train")
    weights = property(lambda self: f"{self.run}/train/final")
    train_metrics = property(lambda self: f"{self.run}/train-metrics")
    train_job = property(lambda self: f"{self.run}/train-job")
    eval = property(lambda self: f"{self.run}/eval")
    rewards = property(lambda self: f"{self.root.rstrip('/')}/rewards")


def parse_names(text: str, what: str = "rewards") -> list[str]:
    """``"a, b"`` or ``'["a", "b"]'`` -> ``["a", "b"]`` (order kept, duplicates an error)."""
    text = (text or "").strip()
    names = json.loads(text) if text.startswith("[") else [n.strip() for n in text.split(",") if n.strip()]
    if not all(isinstance(n, str) and n for n in names):
        raise StepError(f"{what}={text!r}: give comma-separated names, e.g. hps,pickscore")
    if len(set(names)) != len(names):
        raise StepError(f"{what}={text!r} names a reward twice")
    return names


def parse_mapping(text: str, what: str) -> dict[str, str]:
    """``"a=1, b=2"`` or a JSON object -> ``{"a": "1", "b": "2"}`` ("" -> {})."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StepError(f"{what}: not valid JSON ({exc.msg}): write name=value pairs or a JSON object") from None
        return {str(k): v for k, v in value.items()}
    out = {}
    for item in (p.strip() for p in text.split(",")):
        if "=" not in item:
            raise StepError(f"{what}: {item!r} is not name=value; write e.g. hps=0.5,pickscore=0.5")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def check_rewards(names: Sequence[str], what: str = "rewards") -> None:
    """Every name must be a registered reward (``mixgrpo rewards list``)."""
    from mixgrpo.rewards import available_rewards

    known = available_rewards()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StepError(f"{what}: unknown reward {', '.join(map(repr, unknown))}; known rewards: {', '.join(known)}")


# --------------------------------------------------------------------------- prepare-prompts


@dataclass(frozen=True)
class PrepareOutput:
    uri: str
    dataset_hash: str
    n_train: int
    n_test: int


def toy_prompt_file() -> Path:
    """The toy world's prompts (train and held-out) as one text file, the default prompt input.

    Written once to a stable path in the cache (``$MIXGRPO_CACHE/toy-prompts.txt``): the path is part
    of the validation report, so the data set hash stays the same from run to run.
    """
    from mixgrpo.toy.pretrain import default_cache_dir
    from mixgrpo.toy.world import train_test_split

    train, test = train_test_split()
    text = "".join(p + "\n" for p in [*train, *test])
    path = default_cache_dir() / "toy-prompts.txt"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def prompt_source_hash(prompt_uri: str) -> str:
    """sha256 of the prompt source's bytes ("" = the toy world's prompt file): what prepare-prompts is keyed on."""
    import hashlib

    from mixgrpo.data import _read_bytes

    return hashlib.sha256(_read_bytes(prompt_uri.strip() or str(toy_prompt_file()))).hexdigest()


def prepared_prompts_uri(root: str, source_hash: str, **settings: Any) -> str:
    """``{root}/prompts/{key}``, ``key = sha256(source hash + settings)[:16]``: the same data prepared the same
    way goes to the same prefix, so a cached prepare-prompts output still points at its data."""
    import hashlib

    if not re.fullmatch(r"[0-9a-f]{64}", source_hash or ""):
        raise StepError(f"source_hash {source_hash!r}: expected the sha256 hex digest from hash-prompts")
    RunLayout(root, "prompts")  # checks the root's scheme
    key = hashlib.sha256(json.dumps({"source": source_hash, **settings}, sort_keys=True).encode()).hexdigest()[:16]
    return f"{root.rstrip('/')}/prompts/{key}"


def prepare_step(prompt_uri: str, output_uri: str, report_dir: str | Path, *, column: str = "",
                 test_fraction: float = 0.2, min_prompts: int = 16, seed: int = 0,
                 model_uri: str = "", model_kind: str = "toy") -> PrepareOutput:
    """prepare-prompts: ``prompt_uri`` ("" = the toy world's prompts) -> a published data set at ``output_uri``.

    For FLUX the text embeddings (T5 + pooled CLIP) of every prompt are computed once here and
    published beside the data set (``embeddings_uri``), so training never loads the text encoders.
    """
    from mixgrpo.data import prepare_prompts

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # one INFO line per registered function
    source = prompt_uri.strip() or str(toy_prompt_file())
    prepared = prepare_prompts(source, output_uri, report_dir=report_dir, column=column or None,
                               test_fraction=test_fraction, min_rows=min_prompts, seed=seed)
    if model_kind == "flux":
        precompute_embeddings_step(prepared.uri, model_uri)
    return PrepareOutput(prepared.uri, prepared.dataset_hash, prepared.n_train, prepared.n_test)


def embeddings_uri(prompts_uri: str) -> str:
    """The FLUX prompt-embedding cache of a prepared data set: a sibling prefix ``<prompts>-embeddings``."""
    return prompts_uri.rstrip("/") + "-embeddings"


def precompute_embeddings_step(prompts_uri: str, model_uri: str) -> str:
    """Encode the train and test prompts with the model's text encoders; publish the cache; return its URI."""
    import tempfile

    from mixgrpo.data import load_prepared_prompts
    from mixgrpo.models.flux import precompute_prompt_embeddings
    from mixgrpo.storage import publish_dir

    if not model_uri:
        raise StepError("model_kind=flux needs model_uri (the FLUX directory or its s3:// prefix) to encode the prompts")
    prompts = load_prepared_prompts(prompts_uri, "train") + load_prepared_prompts(prompts_uri, "test")
    with tempfile.TemporaryDirectory(prefix="prompt-embeddings-") as tmp:
        result = precompute_prompt_embeddings(model_uri, prompts, tmp)
        publish_dir(tmp, embeddings_uri(prompts_uri), metadata={"prompts": result.encoded + result.cached})
    return embeddings_uri(prompts_uri)


def _stage_embeddings(prompts_uri: str, job: Path) -> bool:
    """Fetch the data set's prompt-embedding cache into ``job/embeddings`` when prepare-prompts made one."""
    from mixgrpo.storage import NotFoundError, fetch_dir

    try:
        fetch_dir(embeddings_uri(prompts_uri), job / "embeddings")
    except NotFoundError:
        return False
    return True


# --------------------------------------------------------------------------- cache-rewards


def cache_rewards_step(rewards: str, held_out: str, weight_sources: str, dest_uri: str,
                       version: str = "v1") -> dict[str, dict[str, str]]:
    """cache-rewards: publish each weighted reward's files once; returns ``rewards.options`` (name -> weights_dir).

    Every reward (optimised and held-out) must exist; a reward with a weight layout
    (hps, pickscore, clip, imagereward) must have a source in ``weight_sources``; rewards
    without weights (the toy world's, UnifiedReward's server) need none.
    """
    from mixgrpo.rewards.cache import REQUIRED_FILES, cache_reward_weights

    names = parse_names(rewards, "rewards") + parse_names(held_out, "held_out_rewards")
    check_rewards(names, "rewards / held_out_rewards")
    sources = parse_mapping(weight_sources, "reward_weight_sources")
    stray = sorted(set(sources) - set(names))
    if stray:
        raise StepError(f"reward_weight_sources names {stray}, which are not among the rewards {names}")
    missing = [n for n in names if n in REQUIRED_FILES and n not in sources]
    if missing:
        raise StepError(f"reward {', '.join(missing)} needs weights: give reward_weight_sources, e.g. "
                        f"{missing[0]}=s3://bucket/path/to/{missing[0]} (a directory with the files listed in "
                        "mixgrpo.rewards.cache)")
    options = {}
    for name, source in sources.items():
        options[name] = {"weights_dir": cache_reward_weights(name, source, dest_uri, version)}
    return options


# --------------------------------------------------------------------------- train


def train_overrides(*, reward_options: Mapping[str, Any] | None = None, extra: str = "",
                    **params: Any) -> dict[str, Any]:
    """The pipeline's training parameters as ``section.key`` overrides of :func:`mixgrpo.config.load_config`.

    ``params``: parameters of :data:`~mixgrpo_pipelines.pipelines.parameters.TRAINING_PARAMETERS` by
    their pipeline names (a missing one takes its default, the config's). A parameter left at its
    default whose key the mode's preset sets is left to the preset (``mode=dancegrpo``:
    ``window.strategy`` "all"). ``extra``: more ``section.key=value`` overrides, one per line (or
    ``;``-separated); they win.
    """
    from mixgrpo.config import MODE_PRESETS, parse_override
    from mixgrpo_pipelines.pipelines.parameters import TRAINING_PARAMETERS, config_defaults

    unknown = sorted(set(params) - set(TRAINING_PARAMETERS))
    if unknown:
        raise StepError(f"train_overrides: {unknown} are not training parameters (known: {', '.join(TRAINING_PARAMETERS)})")
    defaults = config_defaults()
    params = {**defaults, **params}
    if params["mode"] not in MODE_PRESETS:
        raise StepError(f"mode={params['mode']!r}: use one of {', '.join(MODE_PRESETS)}")
    preset = MODE_PRESETS[params["mode"]]
    parse = {"rewards": lambda v: parse_names(v, "rewards"), "held_out_rewards": lambda v: parse_names(v, "held_out_rewards"),
             "reward_weights": lambda v: {k: _number(w, f"reward_weights {k}")
                                          for k, w in parse_mapping(v, "reward_weights").items()}}
    values: dict[str, Any] = {}
    for name, key in TRAINING_PARAMETERS.items():
        if key in preset and params[name] == defaults[name]:
            continue  # left at its default: the mode's preset decides
        values[key] = parse[name](params[name]) if name in parse else params[name]
    values.update({"rewards.options": dict(reward_options or {}), "progress_bar": False,
                   "eval_every": max(1, int(params["iterations"]) // 8), "checkpoint_every": 0})
    for line in re.split(r"[\n;]", extra or ""):
        if line.strip():
            key, value = parse_override(line.strip())
            values[key] = value
    return values


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise StepError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise StepError(f"{what}: {value} must be a finite number >= 0")
    return value


def build_config(overrides: Mapping[str, Any]):  # noqa: ANN201 - TrainConfig
    """The validated TrainConfig of the overrides (unknown rewards are an error naming them)."""
    from mixgrpo.config import load_config

    for key, what in (("rewards.names", "rewards"), ("rewards.held_out", "held_out_rewards")):
        if isinstance(overrides.get(key), (list, tuple)):  # the step's own error, before load_config's
            check_rewards(list(overrides[key]), what)
    cfg = load_config(overrides=dict(overrides))
    check_rewards(list(cfg.rewards.names), "rewards")
    check_rewards(list(cfg.rewards.held_out), "held_out_rewards")
    return cfg


def _local_model(cfg: Any, workdir: Path) -> None:
    """A toy model given as an s3:// / file:// prefix is fetched (FLUX resolves its own prefixes)."""
    from mixgrpo.storage import fetch_dir

    if cfg.model.kind == "toy" and cfg.model.path.startswith(("s3://", "file://")):
        local = workdir / "base-model"
        fetch_dir(cfg.model.path, local)
        cfg.model.path = str(local)


def _stage_prompts(prompts_uri: str, directory: Path, validation_count: int = 0, seed: int = 0) -> None:
    """train.txt and test.txt of the prepared prompts in ``directory``; with ``validation_count`` > 0 also
    validation.txt: that many training prompts (a seeded draw), taken out of train.txt, for checkpoint selection."""
    import random

    from mixgrpo.data import load_prepared_prompts

    directory.mkdir(parents=True, exist_ok=True)
    train, test = (load_prepared_prompts(prompts_uri, split) for split in ("train", "test"))
    splits = {"train": train, "test": test}
    if validation_count:
        if validation_count >= len(train):
            raise StepError(f"select_best needs {validation_count} validation prompts out of the {len(train)} training "
                            "prompts; prepare more prompts (min_prompts) or turn select_best off")
        validation = set(random.Random(seed).sample(range(len(train)), validation_count))
        splits = {"train": [p for i, p in enumerate(train) if i not in validation],
                  "validation": [p for i, p in enumerate(train) if i in validation], "test": test}
    for split, prompts in splits.items():
        (directory / f"{split}.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class TrainOutput:
    weights_uri: str  # the published final/ directory (transformer/ inside)
    metrics_uri: str  # train-metrics/ (metrics.jsonl, config.yaml)
    config_hash: str
    iterations: int
    mlflow_run_id: str = ""  # the pipeline run's MLflow run, logged into live ("" = no tracking)


def start_tracking(tracking_uri: str, experiment: str, pipeline_run_id: str, git_sha: str = "") -> str:
    """The MLflow run the training logs into while it runs ("" when no tracking server is configured).

    Tracking URI: the argument, else $MLFLOW_TRACKING_URI. An unreachable server is a warning, not a
    failed training: the metrics stay in metrics.jsonl and register logs them afterwards.
    """
    from mixgrpo.registry import RegistryError, TAG_GIT_SHA, pipeline_run

    if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        return ""
    try:
        settings = registry_settings(tracking_uri, "")
        return pipeline_run(settings.connect(), experiment, pipeline_run_id=pipeline_run_id,
                            run_name=f"mixgrpo-{pipeline_run_id}"[:250],
                            tags={TAG_GIT_SHA: resolve_git_sha(git_sha) or "unknown"},
                            artifact_location=settings.artifact_location)
    except RegistryError as exc:
        log.warning("MLflow tracking off for this training: %s", exc)
        return ""


def train_step(overrides: Mapping[str, Any], prompts_uri: str, layout: RunLayout, workdir: str | Path, *,
               executor: str = "local", num_nodes: int = 1, procs_per_node: int = 1,
               kubernetes: Mapping[str, Any] | None = None, tracking_uri: str = "", experiment: str = "mixgrpo",
               git_sha: str = "") -> TrainOutput:
    """train: run MixGRPO on the prepared prompts; the final weights end up at ``layout.weights``.

    ``executor`` "local": in this process (``num_nodes * procs_per_node == 1``) or torchrun on this
    machine (one node). "kubernetes": a Kubeflow Trainer TrainJob of ``num_nodes`` x
    ``procs_per_node`` GPUs through :mod:`mixgrpo.trainjob` (``kubernetes``: namespace, queue,
    timeout_s). Checkpoints go to ``layout.train``, so a retried step resumes from the last one.
    """
    from mixgrpo.config import config_hash, config_to_yaml
    from mixgrpo.storage import publish_dir, read_manifest

    if executor not in EXECUTORS:
        raise StepError(f"executor={executor!r}: use one of {', '.join(EXECUTORS)}")
    if num_nodes < 1 or procs_per_node < 1:
        raise StepError(f"num_nodes={num_nodes}, gpus_per_node={procs_per_node}: both must be >= 1")
    if executor == "local" and num_nodes != 1:
        raise StepError(f"executor=local runs on one machine; num_nodes={num_nodes} needs executor=kubernetes")
    workdir = Path(workdir)
    overrides = dict(overrides)
    if num_nodes * procs_per_node > 1 and overrides.get("distributed.engine", "none") == "none":
        overrides["distributed.engine"] = "ddp"  # several processes need an engine; ddp replicates the model
    cfg = build_config({**overrides, "checkpoint_uri": layout.train})
    digest = config_hash(cfg)  # before local paths are filled in: the same parameters give the same hash
    run_id = start_tracking(tracking_uri, experiment, layout.run_id, git_sha)
    if run_id:  # the trainer logs every iteration into the pipeline run's MLflow run as it trains
        cfg.mlflow_tracking_uri = registry_settings(tracking_uri, "").tracking_uri
        cfg.mlflow_experiment, cfg.mlflow_run_id = experiment, run_id
    job = workdir / "train-job"
    _stage_prompts(prompts_uri, job, VALIDATION_COUNT if cfg.select_best else 0, cfg.seed)
    if cfg.model.kind == "flux" and _stage_embeddings(prompts_uri, job):
        cfg.model.embedding_cache_dir = "embeddings"  # relative to the job directory, like the prompts
    if executor == "local":
        _local_model(cfg, workdir)
    cfg.prompts, cfg.eval_prompts = "train.txt", "test.txt"  # relative to the job directory on every node
    cfg.validation_prompts = "validation.txt" if cfg.select_best else ""  # carved out of train.txt: never trained on
    cfg.output_dir = "output"
    (job / "config.yaml").write_text(config_to_yaml(cfg))
    if executor == "kubernetes":
        publish_dir(job, layout.train_job, metadata={"kind": "mixgrpo-train-job/1"})
        _run_trainjob(layout, num_nodes, procs_per_node, dict(kubernetes or {}))
    else:
        run_train_job(job, procs_per_node, layout.train_metrics)
    manifest = read_manifest(layout.weights)  # fails clearly if training did not publish its weights
    iterations = int(manifest.metadata.get("iteration", cfg.max_iterations))
    return TrainOutput(layout.weights, layout.train_metrics, digest, iterations, run_id)


def run_train_job(job_dir: str | Path, procs: int = 1, metrics_uri: str = "", engine: str | None = None) -> int:
    """Train from a job directory (config.yaml, train.txt, test.txt, validation.txt with select_best); publish
    metrics to ``metrics_uri``.

    One process: :func:`mixgrpo.train.train` here. Several: ``torchrun`` (``mixgrpo launch``), which
    also reads the Kubeflow Trainer's PET_* variables on a TrainJob node. Always resumes from the
    newest complete checkpoint (local or under the config's checkpoint_uri). Returns the exit code.
    """
    from mixgrpo.config import load_config
    from mixgrpo.storage import publish_dir

    job_dir = Path(job_dir).resolve()
    cwd = Path.cwd()
    os.chdir(job_dir)  # the config's paths are relative to the job directory
    try:
        if procs == 1 and "PET_NNODES" not in os.environ:
            from mixgrpo.train import train

            train(load_config("config.yaml"), resume=True)
            code = 0
        else:
            from mixgrpo.distributed import run_launch

            code = run_launch(["train", "--config", "config.yaml", "--resume"], engine=engine,
                              nproc_per_node=str(procs))
        if code == 0 and metrics_uri and os.environ.get("PET_NODE_RANK", "0") == "0":
            out = job_dir / "metrics-out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for name in ("metrics.jsonl", "config.yaml"):
                if (job_dir / "output" / name).is_file():
                    shutil.copy(job_dir / "output" / name, out / name)
            publish_dir(out, metrics_uri, metadata={"kind": "mixgrpo-train-metrics/1"})
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"training failed with exit code {code} (see the log above); rerun the step to resume "
                           "from the last complete checkpoint")
    return code


def train_node_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a TrainJob node: ``python -m mixgrpo_pipelines.pipelines.steps train-node --job-uri URI ...``."""
    import argparse

    from mixgrpo.storage import fetch_dir

    parser = argparse.ArgumentParser(prog="python -m mixgrpo_pipelines.pipelines.steps train-node")
    parser.add_argument("--job-uri", required=True, help="the train-job/ prefix the launcher step published")
    parser.add_argument("--metrics-uri", default="", help="where node 0 publishes metrics.jsonl")
    parser.add_argument("--procs", type=int, default=int(os.environ.get("PET_NPROC_PER_NODE", "1") or 1))
    parser.add_argument("--workdir", default=os.environ.get("MIXGRPO_WORKDIR", "/tmp/mixgrpo-train"))
    args = parser.parse_args(argv)
    job = Path(args.workdir) / "train-job"
    fetch_dir(args.job_uri, job)
    return run_train_job(job, args.procs, args.metrics_uri)


def _run_trainjob(layout: RunLayout, num_nodes: int, procs: int, options: dict[str, Any]) -> None:
    from mixgrpo.container_images import image_ref
    from mixgrpo.trainjob import TrainJobSpec, WaitPolicy, connect, run_trainjob

    namespace = options.get("namespace") or _pod_namespace()
    name = f"mixgrpo-{re.sub(r'[^a-z0-9-]', '-', layout.run_id.lower())}"[:63].rstrip("-")
    spec = TrainJobSpec(
        name=name, namespace=namespace, image=image_ref("trainer"),
        command=("python", "-m", "mixgrpo_pipelines.pipelines.steps", "train-node", "--job-uri", layout.train_job,
                 "--metrics-uri", layout.train_metrics, "--procs", str(procs)),
        num_nodes=num_nodes, gpus_per_node=procs, queue=options.get("queue") or None,
        pipeline_run_id=layout.run_id[:63] if re.fullmatch(r"[A-Za-z0-9._-]{1,63}", layout.run_id[:63]) else None,
    )
    policy = WaitPolicy(timeout_s=float(options.get("timeout_s") or WaitPolicy.timeout_s))
    run_trainjob(spec, connect(), policy)


def _pod_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if path.is_file():
        return path.read_text().strip()
    raise StepError("no Kubernetes namespace: run the step in a cluster pod, or pass train_namespace")


# --------------------------------------------------------------------------- evaluate


def eval_metrics(result: Any) -> dict[str, float]:
    """An EvalResult as flat metrics: the gate metric (combined, tuned), per reward tuned / base / delta."""
    metrics = {GATE_METRIC: float(result.combined["tuned"]), f"{GATE_METRIC}.base": float(result.combined["base"])}
    for name in result.tuned:
        metrics[name] = float(result.tuned[name])
        metrics[f"{name}.base"] = float(result.base[name])
        metrics[f"{name}.delta"] = float(result.delta[name])
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def evaluate_step(overrides: Mapping[str, Any], weights_uri: str, prompts_uri: str, metrics_uri: str,
                  eval_uri: str, out_dir: str | Path, *, images_per_prompt: int = 4, max_prompts: int = 0):  # noqa: ANN201
    """evaluate: base vs tuned on the held-out split; the report is written to ``out_dir`` and published to ``eval_uri``."""
    from mixgrpo.data import load_prepared_prompts
    from mixgrpo.evaluate import evaluate
    from mixgrpo.storage import NotFoundError, fetch_dir, publish_dir

    out_dir = Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix="mixgrpo-eval-"))
    try:
        cfg = build_config(overrides)
        _local_model(cfg, work)
        tuned = work / "tuned"
        fetch_dir(weights_uri, tuned)
        training_metrics = None
        try:
            fetch_dir(metrics_uri, work / "train-metrics")
            training_metrics = work / "train-metrics" / "metrics.jsonl"
        except NotFoundError:
            log.warning("no training metrics at %s: the report has no reward curve", metrics_uri)
        prompts = load_prepared_prompts(prompts_uri, "test")
        prompts = prompts[:max_prompts] if max_prompts > 0 else prompts
        result = evaluate(cfg, tuned, out_dir, prompts=prompts, images_per_prompt=images_per_prompt,
                          training_metrics=training_metrics,
                          provenance={"pipeline_run": eval_uri.rstrip("/").split("/")[-2], "weights": weights_uri})
        publish_dir(out_dir, eval_uri, metadata={"kind": "mixgrpo-eval/1", "weights_uri": weights_uri})
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown_report(out_dir: str | Path, eval_uri: str = "") -> str:
    """report.md with the grid and curve embedded as data URIs (renders in the KFP UI as one artifact)."""
    import base64

    out_dir = Path(out_dir)
    text = (out_dir / "report.md").read_text()
    for name in ("grid.png", "rewards.png"):
        if (out_dir / name).is_file():
            data = base64.b64encode((out_dir / name).read_bytes()).decode()
            text = text.replace(f"]({name})", f"](data:image/png;base64,{data})")
    return text + (f"\nFull report: `{eval_uri}`\n" if eval_uri else "")


# --------------------------------------------------------------------------- register and promote


def registry_settings(tracking_uri: str, model_name: str):  # noqa: ANN201 - RegistrySettings
    """Tracking URI: the argument, else $MLFLOW_TRACKING_URI (the cluster's mixgrpo-mlflow secret)."""
    from mixgrpo.registry import RegistryError, RegistrySettings

    if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise RegistryError("mlflow_tracking_uri is empty and MLFLOW_TRACKING_URI is not set: pass the tracking "
                            "server's URL (or sqlite:///ABS/mlflow.db locally)")
    return RegistrySettings.from_env(tracking_uri=tracking_uri or None, model_name=model_name or None)


@dataclass(frozen=True)
class RegisterOutput:
    version: str
    aliases: tuple[str, ...]
    mlflow_run_id: str


def _history(metrics_jsonl: Path) -> dict[str, list[float]]:
    curves: dict[str, list[float]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for name, stats in record.get("rewards", {}).items():
            curves.setdefault(f"train.{name}", []).append(float(stats["mean"]))
        for key in ("loss", "clip_fraction", "approx_kl", "grad_norm"):
            if isinstance(record.get(key), (int, float)):
                curves.setdefault(f"train.{key}", []).append(float(record[key]))
    return {k: v for k, v in curves.items() if all(math.isfinite(x) for x in v)}


PROVENANCE_PARAMS = {"mode": "mode", "iterations": "max_iterations", "learning_rate": "optim.lr",
                     "base_model": "model.path", "model_kind": "model.kind", "seed": "seed"}
"""Version tag -> training parameter: what produced the weights (metrics live in the linked run)."""


def provenance_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """The provenance tags of a model version from the training overrides (``model.path`` "" = the toy base)."""
    tags = {tag: str(params[key]) for tag, key in PROVENANCE_PARAMS.items() if key in params}
    if "base_model" in tags:
        from mixgrpo.toy.pretrain import base_model_label

        tags["base_model"] = base_model_label(tags["base_model"])
    return tags


def register_step(*, tracking_uri: str, model_name: str, experiment: str, weights_uri: str, pipeline_run_id: str,
                  metrics: Mapping[str, float], eval_uri: str, metrics_uri: str, git_sha: str = "",
                  config_hash: str = "", dataset_hash: str = "", params: Mapping[str, Any] | None = None,
                  gate_metric: str = GATE_METRIC, mlflow_run_id: str = "") -> RegisterOutput:
    """register: an MLflow run with the metrics, curves, grid and report, then a model version.

    With ``mlflow_run_id`` (the run training logged into live) the evaluation metrics (``eval/NAME``)
    and the report attach to that run; else a run is logged here. The version's source is
    ``weights_uri`` (no copy), it links to the run, alias ``challenger``; its tags carry provenance
    (pipeline run, git sha, hashes, mode, iterations, lr, base model) and only the gate metric. A retry with the same ``pipeline_run_id`` reuses the run
    and the version. Inputs and the store are checked first: when MLflow is unreachable, or
    ``gate_metric`` is not among the metrics (the gate could never decide), nothing is written.
    """
    from mixgrpo.registry import RegistryError, attach_to_run, log_training_run, register_model
    from mixgrpo.storage import NotFoundError, StorageError, fetch_dir, read_manifest

    if gate_metric not in metrics:
        raise RegistryError(f"gate_metric {gate_metric!r} is not an evaluation metric; choose one of "
                            f"{sorted(metrics)}")
    try:
        read_manifest(weights_uri)  # complete weights, or nothing is registered
    except StorageError as exc:
        raise RegistryError(f"weights_uri {weights_uri}: no published weights there ({exc}); nothing was "
                            "registered") from exc
    settings = registry_settings(tracking_uri, model_name)
    client = settings.connect()  # fails fast, before anything is fetched or written
    git_sha = resolve_git_sha(git_sha)
    with tempfile.TemporaryDirectory(prefix="mixgrpo-register-") as tmp:
        files = Path(tmp)
        fetch_dir(eval_uri, files / "eval")
        (files / "eval" / "MANIFEST.json").unlink(missing_ok=True)
        history = {}
        try:
            fetch_dir(metrics_uri, files / "train")
            (files / "train" / "MANIFEST.json").unlink(missing_ok=True)
            history = _history(files / "train" / "metrics.jsonl") if (files / "train" / "metrics.jsonl").is_file() else {}
        except NotFoundError:
            log.warning("no training metrics at %s", metrics_uri)
        artifacts = {"evaluation": files / "eval"}
        if (files / "train").is_dir():
            artifacts["training"] = files / "train"
        tags = {"weights_uri": weights_uri, "git_sha": git_sha, "config_hash": config_hash,
                "dataset_manifest_hash": dataset_hash}
        if mlflow_run_id:
            last = max((len(v) for v in history.values()), default=0)
            run_id = attach_to_run(client, mlflow_run_id, metrics={f"eval/{k}": v for k, v in metrics.items()},
                                   step=last, artifacts=artifacts, tags={k: v for k, v in tags.items() if v})
        else:
            run_id = log_training_run(
                client, experiment, pipeline_run_id=pipeline_run_id, run_name=f"mixgrpo-{pipeline_run_id}"[:250],
                params=dict(params or {}), metrics=metrics, history=history, artifacts=artifacts,
                tags={k: v for k, v in tags.items() if v}, artifact_location=settings.artifact_location)
        version = register_model(client, settings.model_name, weights_uri, pipeline_run_id=pipeline_run_id,
                                 git_sha=git_sha, config_hash=config_hash, dataset_hash=dataset_hash,
                                 metrics={gate_metric: metrics[gate_metric]}, tags=provenance_tags(params or {}),
                                 mlflow_run_id=run_id, description=f"MixGRPO pipeline run {pipeline_run_id}")
        if (files / "eval" / "scores.jsonl").is_file():  # the report names the version it describes
            from mixgrpo.evaluate import write_report
            from mixgrpo.storage import publish_dir

            write_report(files / "eval", {"model_version": f"{settings.model_name} v{version.version}",
                                          "mlflow_run_id": run_id})
            publish_dir(files / "eval", eval_uri, metadata={"kind": "mixgrpo-eval/1", "weights_uri": weights_uri})
            attach_to_run(client, run_id, artifacts={"evaluation": files / "eval"})
    return RegisterOutput(str(version.version), tuple(sorted(version.aliases)), run_id)


def gate_step(*, tracking_uri: str, model_name: str, version: str, gate_metric: str = GATE_METRIC,
              gate_margin: float = 0.0):  # noqa: ANN201 - PromotionDecision
    """The promotion gate (read-only): does ``version`` beat the ``champion`` by ``gate_margin`` on ``gate_metric``?"""
    from mixgrpo.registry import decide_promotion

    settings = registry_settings(tracking_uri, model_name)
    return decide_promotion(settings.connect(), settings.model_name, version, gate_metric, gate_margin)


def promote_step(*, tracking_uri: str, model_name: str, version: str, gate_metric: str = GATE_METRIC,
                 gate_margin: float = 0.0) -> dict[str, Any]:
    """promote: decide again (the champion may have moved since register) and move ``champion`` when it wins."""
    from mixgrpo.registry import decide_promotion, promote

    settings = registry_settings(tracking_uri, model_name)
    client, name = settings.connect(), settings.model_name
    decision = decide_promotion(client, name, version, gate_metric, gate_margin)
    if decision.promote:
        promote(client, name, version, decision)
    return decision.to_dict()


def model_aliases(tracking_uri: str, model_name: str, version: str) -> list[str]:
    """The aliases pointing at ``version`` now."""
    settings = registry_settings(tracking_uri, model_name)
    client = settings.connect()
    return sorted(client.get_model_version(settings.model_name, version).aliases)


if __name__ == "__main__":  # a TrainJob node: python -m mixgrpo_pipelines.pipelines.steps train-node --job-uri ...
    if sys.argv[1:2] != ["train-node"]:
        sys.exit("usage: python -m mixgrpo_pipelines.pipelines.steps train-node --job-uri URI [--metrics-uri URI] [--procs N]")
    sys.exit(train_node_main(sys.argv[2:]))
