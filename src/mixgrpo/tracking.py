"""Metrics of a training run: ``metrics.jsonl`` (one JSON record per iteration), mirrored live to MLflow."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from mixgrpo.config import TrainConfig, config_to_dict


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop the records past ``iteration`` (logged before a crash, about to be logged again) and a torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(record.get("iteration", 0)) <= iteration:
            kept.append(line)
    path.write_text("".join(f"{line}\n" for line in kept))

def mlflow_metrics(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as MLflow metrics with ``/``-separated names.

    ``rewards.NAME.mean`` -> ``train/reward/NAME`` (``.std`` -> ``train/reward_std/NAME``),
    ``held_out.NAME`` -> ``eval/held_out/NAME``, any other number ``KEY`` -> ``train/KEY``.
    """
    out = {}
    for key, value in _flat(record).items():
        if key in ("iteration", "final") or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            continue
        parts = key.split("/")
        if parts[0] == "rewards" and len(parts) == 3:
            name = f"train/{'reward' if parts[2] == 'mean' else 'reward_' + parts[2]}/{parts[1]}"
        elif parts[0] == "held_out":
            name = "eval/" + key
        else:
            name = "train/" + key
        out[name] = float(value)
    return out

class MetricsLog:
    """Append-only JSON-lines metrics file, mirrored live to MLflow when a tracking URI is set, and a
    progress line every few iterations when no tqdm bar runs (see :mod:`mixgrpo.console`).

    MLflow: the run ``cfg.mlflow_run_id`` (the pipeline's) or a new one; params = the resolved config
    and the git sha; one metric point per iteration (step = iteration) as it happens.
    """

    def __init__(self, path: Path, cfg: TrainConfig, start_iteration: int = 0, progress: bool = True):
        from mixgrpo.console import progress_every

        self.path = path
        self.mlflow = None
        self.total = cfg.max_iterations
        self.every = progress_every(cfg.max_iterations) if progress else 0
        self.started, self.start_iteration = time.perf_counter(), start_iteration
        if cfg.mlflow_tracking_uri:  # a client, not mlflow's process-global fluent state
            from mlflow import MlflowClient
            from mlflow.entities import Param

            from mixgrpo.transport import check_secret_transport

            if os.environ.get("MLFLOW_TRACKING_TOKEN") and cfg.mlflow_tracking_uri.startswith("http"):
                check_secret_transport(cfg.mlflow_tracking_uri, "$MLFLOW_TRACKING_TOKEN")
            from mixgrpo.provenance import resolve_git_sha

            client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
            if cfg.mlflow_run_id:
                client.update_run(cfg.mlflow_run_id, status="RUNNING")
                run = client.get_run(cfg.mlflow_run_id)
            else:
                experiment = client.get_experiment_by_name(cfg.mlflow_experiment)
                experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.mlflow_experiment)
                run = client.create_run(experiment_id, run_name=Path(cfg.output_dir).name)
            self.run_id = run.info.run_id
            params = {k: str(v)[:250] for k, v in _flat(config_to_dict(cfg)).items()}
            params["git_sha"] = resolve_git_sha() or "unknown"
            new = [Param(k, v) for k, v in params.items() if k not in run.data.params]  # a resumed run has them
            for start in range(0, len(new), 100):  # MLflow's limit per request
                client.log_batch(self.run_id, params=new[start:start + 100])
            self.mlflow = client

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now, step = int(time.time() * 1000), int(record["iteration"])
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in mlflow_metrics(record).items()])
        done = int(record["iteration"])
        if self.every and "rewards" in record and (done % self.every == 0 or done == self.total):
            from mixgrpo.console import progress_line, say

            per_iteration = (time.perf_counter() - self.started) / max(done - self.start_iteration, 1)
            say(progress_line(record, self.total, per_iteration))
        elif self.every and record.get("final"):
            from mixgrpo.console import held_out_line, say

            say(held_out_line(record["held_out"]))

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.run_id, "FINISHED")

def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
