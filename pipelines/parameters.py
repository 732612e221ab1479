"""The pipeline's parameters: which training-config key each one sets, and the defaults it takes from the config.

:data:`CONFIG_KEYS` is the one table: every parameter of :func:`mixgrpo_pipeline` -> the
:class:`mixgrpo.config.TrainConfig` key it sets (``None``: a pipeline setting with no config key).
The pipeline's defaults of the mapped parameters are the config's own (``mixgrpo config``: the
paper's FLUX numbers), read by :func:`config_defaults`; the train step turns the values back into
config overrides (:func:`mixgrpo_pipelines.pipelines.steps.train_overrides`). A parameter left at
its default lets the mode's preset decide the keys the preset sets (e.g. ``mode=mixgrpo-flash``:
``window.shift_interval`` 20). ``tests/test_pipeline.py`` fails when this table, the pipeline's
signature and the train component's disagree, and when the README's table is stale.
"""

from __future__ import annotations

import functools
from typing import Any

CONFIG_KEYS: dict[str, str | None] = {
    "model_uri": "model.path",
    "model_kind": "model.kind",
    "prompt_uri": None,
    "prompt_column": None,
    "test_fraction": None,
    "min_prompts": None,
    "rewards": "rewards.names",
    "reward_weights": "rewards.weights",
    "held_out_rewards": "rewards.held_out",
    "reward_weight_sources": None,
    "mode": "mode",
    "window_size": "window.size",
    "window_shift_interval": "window.shift_interval",
    "window_strategy": "window.strategy",
    "iterations": "max_iterations",
    "group_size": "sampling.group_size",
    "prompts_per_iteration": "prompts_per_iteration",
    "train_batch_size": "optim.train_batch_size",
    "learning_rate": "optim.lr",
    "seed": "seed",
    "executor": None,
    "num_nodes": None,
    "gpus_per_node": None,
    "engine": "distributed.engine",
    "extra_overrides": None,
    "train_namespace": None,
    "kueue_queue": None,
    "train_timeout_hours": None,
    "eval_images_per_prompt": None,
    "eval_max_prompts": None,
    "eval_gpus": None,
    "mlflow_model_name": None,
    "mlflow_experiment": "mlflow_experiment",
    "gate_metric": None,
    "gate_margin": None,
    "object_store_uri": None,
    "mlflow_tracking_uri": None,
    "git_sha": None,
}
"""Pipeline parameter -> training-config key (None: not a training-config knob)."""

TRAINING_PARAMETERS: dict[str, str] = {name: key for name, key in CONFIG_KEYS.items() if key}
"""The parameters that set a config key: the train component's training inputs."""

EVALUATION_PARAMETERS: dict[str, str] = {"eval_images_per_prompt": "eval_images_per_prompt"}
"""Evaluate-step parameters whose default and preset value are a config key's: the evaluation samples as many
seeds per held-out prompt as the trainer's own held-out evaluation, so the two report the same numbers."""

CONFIG_PARAMETERS: dict[str, str] = {**TRAINING_PARAMETERS, **EVALUATION_PARAMETERS}
"""Every parameter whose default (and preset value) is a config key's."""


def config_value(cfg: Any, key: str) -> Any:
    """``cfg`` at the dotted ``key`` (``"optim.lr"`` -> ``cfg.optim.lr``)."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def as_parameter(value: Any) -> Any:
    """A config value as a pipeline parameter: a list -> ``"a,b"``, a mapping -> ``"a=1,b=2"``, else unchanged."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return value


@functools.lru_cache(maxsize=None)
def _defaults() -> tuple[tuple[str, Any], ...]:
    from mixgrpo.config import load_config

    cfg = load_config()  # = `mixgrpo config`: the dataclass defaults and the default mode's preset
    return tuple((name, as_parameter(config_value(cfg, key))) for name, key in CONFIG_PARAMETERS.items())


def config_defaults() -> dict[str, Any]:
    """The pipeline defaults of the mapped parameters (training and evaluation): the config's defaults as parameter values."""
    return dict(_defaults())


def preset_arguments(preset: str) -> tuple[dict[str, Any], list[str]]:
    """The pipeline arguments that train as the config ``preset`` does (a shipped name such as ``toy``, or a file).

    Returns the mapped parameters whose preset value differs from the pipeline default, and the
    other config keys that differ (as ``section.key=value`` lines for ``extra_overrides``), except
    the ones the train step sets itself (paths, checkpoint and evaluation cadence, progress output).
    """
    import json

    from mixgrpo.config import flat_config, load_config

    cfg = load_config(preset)
    base = flat_config(load_config(overrides={"mode": cfg.mode}))  # every parameter at its default, the preset's mode
    defaults = config_defaults()
    arguments = {name: as_parameter(config_value(cfg, key)) for name, key in CONFIG_PARAMETERS.items()}
    arguments = {name: value for name, value in arguments.items() if value != defaults[name]}
    mapped = set(TRAINING_PARAMETERS.values())
    extra = [f"{key}={json.dumps(value)}" for key, value in flat_config(cfg).items()
             if key not in mapped and key not in STEP_OWNED_KEYS and value != base.get(key)]
    return arguments, extra


STEP_OWNED_KEYS = frozenset({
    "output_dir", "prompts", "eval_prompts", "validation_prompts", "checkpoint_every", "checkpoint_uri",
    "eval_every", "progress_bar", "mlflow_tracking_uri", "mlflow_run_id", "model.embedding_cache_dir",
})
"""Config keys the train step sets itself (job-relative paths, checkpoint / evaluation cadence, tracking)."""



TABLE_BEGIN = "<!-- parameter table: generated by `python -m mixgrpo_pipelines.pipelines.parameters pipelines/README.md` -->"
TABLE_END = "<!-- end of the parameter table -->"


def parameter_table() -> str:
    """The README's Markdown table of the pipeline parameters: name, type, default, config key, meaning.

    Read from the pipeline's signature and docstring (what the KFP UI shows) and :data:`CONFIG_KEYS`.
    """
    import json

    from mixgrpo_pipelines.pipelines.mixgrpo_pipeline import mixgrpo_pipeline

    rows = ["| name | type | default | config key | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, spec in (mixgrpo_pipeline.component_spec.inputs or {}).items():
        key = f"`{CONFIG_KEYS[name]}`" if CONFIG_KEYS[name] else ""
        rows.append(f"| `{name}` | {spec.type.lower()} | `{json.dumps(spec.default)}` | {key} | {spec.description or ''} |")
    return "\n".join(rows)


def with_parameter_table(readme: str) -> str:
    """``readme`` with the text between :data:`TABLE_BEGIN` and :data:`TABLE_END` replaced by :func:`parameter_table`."""
    if TABLE_BEGIN not in readme or TABLE_END not in readme:
        raise ValueError(f"the README has no parameter table markers: add the lines {TABLE_BEGIN!r} and {TABLE_END!r}")
    head, rest = readme.split(TABLE_BEGIN, 1)
    return f"{head}{TABLE_BEGIN}\n{parameter_table()}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"


if __name__ == "__main__":  # python -m mixgrpo_pipelines.pipelines.parameters pipelines/README.md: rewrite its table
    import sys
    from pathlib import Path

    for path in map(Path, sys.argv[1:]):
        path.write_text(with_parameter_table(path.read_text()))
        print(f"wrote the parameter table of {path}")
