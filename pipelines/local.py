"""Run the whole MixGRPO DAG on this machine through ``kfp.local`` (the product's main command).

``mixgrpo run-local`` = :func:`run_local` with the embedded defaults: the built-in toy model, the
object store in ``runs/local/store`` (``file://``), MLflow in ``runs/local/mlflow.db`` (sqlite),
KFP's local pipeline root in ``runs/local/kfp``. ``--store s3://...`` and ``--mlflow http://...``
point it at real servers (credentials from the usual AWS_* / MLFLOW_* environment variables).
Each step runs as a subprocess of this Python (``SubprocessRunner(use_venv=False)``), exactly the
component code a cluster runs.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL_DIR = Path("runs", "local").absolute()  # under the working directory: an installed package has no checkout


def default_store() -> str:
    return (LOCAL_DIR / "store").as_uri()


def default_mlflow() -> str:
    return f"sqlite:///{LOCAL_DIR / 'mlflow.db'}"


@dataclass
class LocalRunResult:
    weights_uri: str
    model_version: str
    aliases: list[str]
    champion: str | None
    eval_uri: str
    report_dir: Path  # a local copy of the evaluation report (report.md / .html, grid.png)
    metrics: dict[str, Any]  # the evaluation's metrics.json
    seconds: float
    arguments: dict[str, Any] = field(default_factory=dict)


# The toy model learns too slowly at FLUX's lr 1e-5 (see configs/toy.yaml); explicit --param values win.
TOY_LOCAL_DEFAULTS: dict[str, Any] = {"learning_rate": 5e-5, "window_shift_interval": 20, "iterations": 80}


def run_local(store: str | None = None, mlflow: str | None = None, *, local_dir: str | Path | None = None,
              **params: Any) -> LocalRunResult:
    """Run the pipeline with ``kfp.local``; ``params`` are pipeline parameters (the embedded defaults fill the rest).

    ``local_dir`` (default ``runs/local``) holds KFP's local pipeline root and the fetched report.
    """
    import kfp.local

    from mixgrpo.pipeline_steps import registry_settings
    from mixgrpo.registry import CHAMPION, alias_version
    from mixgrpo.storage import fetch_dir
    from mixgrpo_pipelines.pipelines.mixgrpo_pipeline import mixgrpo_pipeline

    started = time.perf_counter()
    local = Path(local_dir) if local_dir else LOCAL_DIR
    local.mkdir(parents=True, exist_ok=True)
    toy = not params.get("model_uri")
    arguments = {"object_store_uri": store or default_store(), "mlflow_tracking_uri": mlflow or default_mlflow(),
                 "executor": "local", **(TOY_LOCAL_DEFAULTS if toy else {}), **params}
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(local / "kfp"),
                   raise_on_error=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 shared cores oversubscribe badly
    task = mixgrpo_pipeline(**arguments)
    outputs = task.outputs
    version = str(outputs["model_version"])
    settings = registry_settings(arguments["mlflow_tracking_uri"], arguments.get("mlflow_model_name", ""))
    client = settings.connect()
    aliases = sorted(client.get_model_version(settings.model_name, version).aliases)
    champion = alias_version(client, settings.model_name, CHAMPION)
    run_id = outputs["eval_uri"].rstrip("/").split("/")[-2]  # .../runs/RUN_ID/eval
    report_dir = local / "reports" / run_id
    fetch_dir(outputs["eval_uri"], report_dir)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    return LocalRunResult(outputs["weights_uri"], version, aliases, champion, outputs["eval_uri"], report_dir, metrics,
                          time.perf_counter() - started, arguments)


def summary(result: LocalRunResult) -> str:
    """What ``mixgrpo run-local`` prints at the end."""
    from mixgrpo.evaluate import EvalResult, metrics_table

    evaluation = EvalResult(**{k: v for k, v in result.metrics.items() if k in EvalResult.__dataclass_fields__})
    name = result.arguments.get("mlflow_model_name", "mixgrpo-dit")
    lines = [
        "",
        f"pipeline finished in {result.seconds:.0f} s",
        f"weights:        {result.weights_uri}",
        f"MLflow:         {result.arguments['mlflow_tracking_uri']}",
        f"model version:  {name} v{result.model_version}  aliases: {', '.join(result.aliases) or '(none)'}  "
        f"(champion: {'v' + result.champion if result.champion else 'none'})",
        "",
        metrics_table(evaluation),
        "",
        f"report:         {result.report_dir / 'report.html'} (and report.md; grid {result.report_dir / 'grid.png'})",
        f"published at:   {result.eval_uri}",
    ]
    return "\n".join(line for line in lines if line is not None)


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["iterations=20", "gate_margin=0.5"]`` -> typed pipeline arguments (types from the pipeline signature)."""
    from mixgrpo_pipelines.pipelines.mixgrpo_pipeline import mixgrpo_pipeline

    inputs = mixgrpo_pipeline.component_spec.inputs or {}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in inputs:
            known = ", ".join(sorted(inputs))
            raise ValueError(f"pipeline parameter {item!r}: write NAME=VALUE with NAME one of {known}")
        kind = inputs[key].type
        try:
            out[key] = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "Integer": int, "Float": float}.get(kind, str)(value)
        except ValueError:
            raise ValueError(f"pipeline parameter {key}={value!r}: expected {kind}") from None
        if kind in ("BOOLEAN", "Boolean"):
            out[key] = value.lower() in ("1", "true", "yes")
    return out


def main(args: Any) -> int:
    """``mixgrpo run-local`` (argparse namespace from mixgrpo.cli)."""
    params = parse_params(list(args.param or []))
    if args.iterations is not None:
        params["iterations"] = args.iterations
    if args.gate_margin is not None:
        params["gate_margin"] = args.gate_margin
    result = run_local(args.store, args.mlflow, **params)
    print(summary(result))
    sys.stdout.flush()
    return 0
