"""Run the whole MixGRPO DAG on this machine through ``kfp.local`` (the product's main command).

``mixgrpo run-local`` = :func:`run_local` with the toy preset (``mixgrpo/presets/toy.yaml``) over the
pipeline defaults: the built-in toy model, the
object store in ``runs/local/store`` (``file://``), MLflow in ``runs/local/mlflow.db`` (sqlite),
KFP's local pipeline root in ``runs/local/kfp``. ``--store s3://...`` and ``--mlflow http://...``
point it at real servers (credentials from the usual AWS_* / MLFLOW_* environment variables).
Each step runs as a subprocess of this Python (``SubprocessRunner(use_venv=False)``), exactly the
component code a cluster runs.
"""

import json
import os
import re
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
    logs: Path | None = None  # the folder of the step logs
    step_logs: dict[str, Path] = field(default_factory=dict)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"Executing task '([^']+)'")
_TASK_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_ERROR_LINE = re.compile(r"[\w.]*(Error|Exception|Interrupt): ")


class StepConsole:
    """While the pipeline runs: everything written to stdout / stderr goes to ``logs/<step>.log`` (and
    ``logs/pipeline.log``); the terminal gets one line per finished step (name, seconds, the step's
    ``[mixgrpo]`` summary line), the trainer's progress lines, and a failed step's last lines.

    kfp.local streams each step's subprocess through this process's ``sys.stdout`` and announces
    steps with "Executing task 'NAME'" / "Task 'NAME' finished with status S", which is how lines
    are assigned to steps.
    """

    def __init__(self, logs: Path, echo: Any = None):
        from mixgrpo.console import MARK_ENV

        self.logs, self.echo = logs, echo or sys.__stdout__
        self.step, self.started, self.summary = "pipeline", time.perf_counter(), ""
        self.step_logs: dict[str, Path] = {}
        self.failed = ""  # the last step that failed
        self.buffer = ""
        self.mark_env = MARK_ENV

    def __enter__(self) -> "StepConsole":
        import logging

        self.logs.mkdir(parents=True, exist_ok=True)
        self.all = (self.logs / "pipeline.log").open("a", encoding="utf-8")
        self.file = self.all
        self.saved = sys.stdout, sys.stderr, os.environ.get(self.mark_env)
        os.environ[self.mark_env] = "1"
        sys.stdout = sys.stderr = self  # type: ignore[assignment]
        self.quiet = {name: logging.getLogger(name).level for name in ("kfp", "great_expectations", "mlflow", "alembic")}
        for name in self.quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc: Any) -> None:
        import logging

        self.flush()
        if exc[0] is not None and self.failed:
            log_file = self.step_logs[self.failed]
            tail = log_file.read_text(encoding="utf-8").splitlines()[-20:]
            self._say("\n".join("     | " + t for t in tail) + f"\n     full log of {self.failed}: {log_file}")
        sys.stdout, sys.stderr, mark = self.saved
        if mark is None:
            os.environ.pop(self.mark_env, None)
        for name, level in self.quiet.items():
            logging.getLogger(name).setLevel(level)
        if self.file is not self.all:
            self.file.close()
        self.all.close()

    # file-like interface
    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.all.flush()
        if self.file is not self.all:
            self.file.flush()

    def isatty(self) -> bool:
        return False

    def _say(self, text: str) -> None:
        self.echo.write(text + "\n")
        self.echo.flush()

    def _line(self, line: str) -> None:
        from mixgrpo.console import CONSOLE_MARK

        plain = _ANSI.sub("", line)
        self.all.write(plain + "\n")
        if self.file is not self.all:
            self.file.write(plain + "\n")
            self.file.flush()  # `tail -f` the step's log while it runs
        if start := _TASK_START.search(plain):
            self.step, self.started, self.summary = start.group(1), time.perf_counter(), ""
            path = self.logs / f"{self.step}.log"
            self.step_logs[self.step] = path
            if self.file is not self.all:
                self.file.close()
            self.file = path.open("a", encoding="utf-8")
            self.file.write(plain + "\n")
        elif end := _TASK_END.search(plain):
            seconds = time.perf_counter() - self.started
            ok = end.group(2) == "SUCCESS"
            if not ok:  # one line per failed attempt (KFP may retry); the log's tail once, at the end
                self.file.flush()
                self.failed = end.group(1)
                errors = [t.strip() for t in self.step_logs[self.failed].read_text(encoding="utf-8").splitlines()
                          if _ERROR_LINE.match(t.strip())]
                self.summary = (errors[-1] if errors else "see its log")[:300]
            self._say(f"{'ok  ' if ok else 'FAIL'} {end.group(1):<16}{seconds:7.1f} s  {self.summary}")
        stripped = plain.strip()
        if stripped.startswith(CONSOLE_MARK):
            text = stripped[len(CONSOLE_MARK):]
            if text.startswith(("iter ", "held-out ")):  # the trainer's progress: shown as it comes
                self._say(f"     {self.step}: {text}")
            else:
                self.summary = text


TOY_PROCESSES = 2
"""Training processes of the shipped ``toy`` preset's local run (DDP over gloo, one per core of the 2-core reference
machine). Each trains the preset's ``prompts_per_iteration``: an iteration is 2 x 4 prompts, as
``mixgrpo launch --nproc-per-node 2 -- train --config toy`` trains."""


def local_preset_arguments(preset: str) -> tuple[dict[str, Any], list[str]]:
    """``preset_arguments`` of the preset, with the ``toy`` preset's :data:`TOY_PROCESSES` processes."""
    from mixgrpo_pipelines.pipelines.parameters import preset_arguments

    arguments, extra = preset_arguments(preset)
    return ({**arguments, "gpus_per_node": TOY_PROCESSES} if preset == "toy" else arguments), extra


def preset_parameters(preset: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline arguments of a training ``preset`` (e.g. ``toy``; None = none) under ``params``, which win.

    The preset's ``extra_overrides`` lines come before those of ``params`` (later lines win). The ``toy``
    preset trains on :data:`TOY_PROCESSES` processes.
    """
    if not preset:
        return dict(params)
    arguments, extra = local_preset_arguments(preset)
    lines = [*extra, *(line for line in str(params.get("extra_overrides", "")).splitlines() if line.strip())]
    return {**arguments, **params, **({"extra_overrides": "\n".join(lines)} if lines else {})}


def describe_preset(preset: str) -> str:
    """One line: the preset's file and the pipeline arguments it sets (what ``mixgrpo run-local`` prints)."""
    from mixgrpo.config import resolve_config_path

    arguments, extra = local_preset_arguments(preset)
    values = [f"{k}={v}" for k, v in arguments.items()] + [f"extra_overrides {line}" for line in extra]
    return f"preset {preset} ({resolve_config_path(preset)}): {', '.join(values) or 'the pipeline defaults'}"


def run_local(store: str | None = None, mlflow: str | None = None, *, preset: str | None = None,
              local_dir: str | Path | None = None, echo: Any = None, **params: Any) -> LocalRunResult:
    """Run the pipeline with ``kfp.local``; ``params`` are pipeline parameters over the training ``preset``'s
    (a shipped name such as ``toy`` or a YAML file; None = the pipeline defaults, the paper's FLUX numbers).

    ``local_dir`` (default ``runs/local``) holds KFP's local pipeline root and the fetched report.
    """
    import kfp.local

    from mixgrpo_pipelines.pipelines.steps import registry_settings
    from mixgrpo.registry import CHAMPION, alias_version
    from mixgrpo.storage import fetch_dir
    from mixgrpo_pipelines.pipelines.mixgrpo_pipeline import mixgrpo_pipeline

    started = time.perf_counter()
    local = Path(local_dir) if local_dir else LOCAL_DIR
    local.mkdir(parents=True, exist_ok=True)
    arguments = {"object_store_uri": store or default_store(), "mlflow_tracking_uri": mlflow or default_mlflow(),
                 "executor": "local", **preset_parameters(preset, params)}
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(local / "kfp"),
                   raise_on_error=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 shared cores oversubscribe badly
    logs = local / "logs" / time.strftime("%Y%m%d-%H%M%S")
    with StepConsole(logs, echo=echo) as console:
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
                          time.perf_counter() - started, arguments, logs, console.step_logs)


def summary(result: LocalRunResult) -> str:
    """What ``mixgrpo run-local`` prints at the end."""
    from mixgrpo.evaluate import EvalResult, metrics_table

    evaluation = EvalResult(**{k: v for k, v in result.metrics.items() if k in EvalResult.__dataclass_fields__})
    name = result.arguments.get("mlflow_model_name", "mixgrpo-dit")
    tracking = result.arguments["mlflow_tracking_uri"]
    warnings = [f"WARNING: {w}" for w in evaluation.warnings()]
    lines = [
        "",
        f"pipeline finished in {result.seconds:.0f} s",
        f"weights:        {result.weights_uri}",
        f"MLflow:         {tracking}",
        f"model version:  {name} v{result.model_version}  aliases: {', '.join(result.aliases) or '(none)'}  "
        f"(champion: {'v' + result.champion if result.champion else 'none'})",
        "",
        metrics_table(evaluation),
        *warnings,
        "",
        f"report:         {result.report_dir / 'report.html'} (and report.md; grid {result.report_dir / 'grid.png'})",
        f"published at:   {result.eval_uri}",
        f"step logs:      {result.logs}/" if result.logs else None,
        f"sample:         mixgrpo sample --model {result.weights_uri} --out grid.png",
        f"                MLFLOW_TRACKING_URI={tracking} mixgrpo sample --model models:/{name}@champion --out grid.png",
    ]
    return "\n".join(line for line in lines if line is not None)


def summary_json(result: LocalRunResult) -> dict[str, Any]:
    """The one-line JSON of ``mixgrpo run-local --json`` (issue 10.5): weights, version, every reward's
    base / tuned / delta with its 95% CI, the combined optimised reward with ``gap_closed``, diversity."""
    from mixgrpo.eval_sampler import DIVERSITY
    from mixgrpo.evaluate import EvalResult

    evaluation = EvalResult(**{k: v for k, v in result.metrics.items() if k in EvalResult.__dataclass_fields__})
    rewards = {name: {"kind": evaluation.kind(name), "base": evaluation.base[name], "tuned": evaluation.tuned[name],
                      "delta": evaluation.delta[name], "delta_ci95": evaluation.ci95.get(name, {}).get("delta")}
               for name in evaluation.base if name != DIVERSITY}
    c = evaluation.combined
    return {"weights_uri": result.weights_uri, "model_name": result.arguments.get("mlflow_model_name", "mixgrpo-dit"),
            "model_version": result.model_version, "aliases": list(result.aliases),
            "report": str(result.report_dir / "report.html"), "rewards": rewards,
            "combined": {"base": c["base"], "tuned": c["tuned"], "delta": c["tuned"] - c["base"],
                         "delta_ci95": c.get("delta_ci95"), "gap_closed": c.get("gap_closed")},
            "diversity": {"base": evaluation.base.get(DIVERSITY), "tuned": evaluation.tuned.get(DIVERSITY)}}


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
    preset = args.preset if args.preset is not None else ("" if params.get("model_uri") else "toy")
    preset = None if preset in ("", "none") else preset
    print(f"mixgrpo run-local: store {args.store or default_store()}, MLflow {args.mlflow or default_mlflow()}")
    print(describe_preset(preset) + " (--param / --iterations win)" if preset else
          "no preset: the pipeline defaults (the training config's, `mixgrpo config`)")
    sys.stdout.flush()
    try:
        result = run_local(args.store, args.mlflow, preset=preset, **params)
    except RuntimeError as error:  # kfp.local: "Task 'NAME' finished with status FAILURE"
        print(f"mixgrpo run-local failed: {_ANSI.sub('', str(error))} (its last lines and log "
              "file are shown above)", file=sys.stderr)
        return 1
    print(summary(result))
    if getattr(args, "json", False):
        print(json.dumps(summary_json(result)))
    sys.stdout.flush()
    return 0
