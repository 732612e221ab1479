"""The KFP pipeline: compilation, the committed YAML, and each step's logic through the library.

The steps run exactly the functions the components call (``mixgrpo_pipelines.pipelines.steps``) on tiny
inputs: a ``file://`` object store in tmp_path and an sqlite MLflow store (the embedded default).
The end-to-end run through ``kfp.local`` against real S3 and MLflow servers is in
``test_pipeline_e2e.py``.
"""

import ast
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

from mixgrpo_pipelines.pipelines import steps  # noqa: E402
from mixgrpo.data import DataError, PromptValidationError  # noqa: E402
from mixgrpo.registry import CHALLENGER, CHAMPION, RegistryError  # noqa: E402
from mixgrpo.storage import NotFoundError, publish_dir, read_manifest  # noqa: E402

TASKS = {"hash-prompts", "prepare-prompts", "cache-rewards", "train", "evaluate", "register", "gate", "promote"}


# --------------------------------------------------------------------------- compile


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from kfp import compiler

    from mixgrpo_pipelines.pipelines.mixgrpo_pipeline import mixgrpo_pipeline

    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    compiler.Compiler().compile(mixgrpo_pipeline, str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    return {"spec": docs[0], "platform": docs[1] if len(docs) > 1 else {}}


def _all_tasks(spec: dict) -> dict[str, dict]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_every_ui_parameter_has_a_default_and_a_description(compiled: dict) -> None:
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    for required in ("model_uri", "prompt_uri", "rewards", "reward_weights", "mode", "window_size",
                     "window_shift_interval", "iterations", "group_size", "num_nodes", "gpus_per_node",
                     "mlflow_model_name", "gate_metric", "gate_margin", "object_store_uri", "mlflow_tracking_uri"):
        assert required in params, required
    missing_default = [n for n, p in params.items() if "defaultValue" not in p and not p.get("isOptional")]
    missing_description = [n for n, p in params.items() if not p.get("description")]
    assert not missing_default and not missing_description, (missing_default, missing_description)


def test_dag_shape_display_names_caching_retries_and_gate(compiled: dict) -> None:
    spec = compiled["spec"]
    tasks = _all_tasks(spec)
    assert set(tasks) - {"condition-1", "condition-2"} >= TASKS
    for name in TASKS:
        assert tasks[name]["taskInfo"]["name"] != name, f"{name} has no display name"
    for name in ("train", "evaluate", "register", "gate", "promote"):
        assert tasks[name]["cachingOptions"].get("enableCache") is not True, f"{name} must not be cached"
    for name in ("prepare-prompts", "cache-rewards", "evaluate", "register", "gate", "promote"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 1, name
    deps = {n: set(t.get("dependentTasks", [])) for n, t in tasks.items()}
    assert deps["train"] == {"prepare-prompts", "cache-rewards"} and deps["prepare-prompts"] == {"hash-prompts"}
    assert tasks["hash-prompts"]["cachingOptions"].get("enableCache") is not True  # reads the data every run
    assert tasks["prepare-prompts"]["cachingOptions"].get("enableCache") is True  # keyed on the content hash
    assert deps["evaluate"] >= {"train", "prepare-prompts"} and "train" in deps["register"] and "evaluate" in deps["register"]
    conditions = [t for t in tasks.values() if t.get("triggerPolicy", {}).get("condition")]
    assert len(conditions) == 1 and "gate" in conditions[0]["triggerPolicy"]["condition"]
    condition_dag = spec["components"][conditions[0]["componentRef"]["name"]]["dag"]["tasks"]
    assert set(condition_dag) == {"promote"}
    assert tasks["evaluate"]["taskInfo"]["name"] and "accelerator" in json.dumps(spec["deploymentSpec"]["executors"]["exec-evaluate"])


def test_secrets_come_from_kubernetes_secrets_never_parameters(compiled: dict) -> None:
    executors = compiled["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-prepare-prompts", "exec-train", "exec-evaluate", "exec-register"):
        secrets = {s["secretName"] for s in executors[name]["secretAsEnv"]}
        assert "mixgrpo-s3" in secrets, name
    for name in ("exec-register", "exec-gate", "exec-promote", "exec-train"):
        assert "mixgrpo-mlflow" in {s["secretName"] for s in executors[name]["secretAsEnv"]}, name
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if any(w in p.lower() for w in ("secret", "password", "token", "access_key"))]


def test_committed_yaml_is_fresh(tmp_path: Path) -> None:
    from mixgrpo_pipelines.pipelines.cluster import PIPELINE_YAML, compile_pipeline

    fresh = compile_pipeline(tmp_path / "fresh.yaml").read_text()
    assert PIPELINE_YAML.is_file(), "pipelines/mixgrpo_pipeline.yaml is missing: run `mixgrpo pipeline compile`"
    assert PIPELINE_YAML.read_text() == fresh, ("pipelines/mixgrpo_pipeline.yaml is stale: run "
                                                "`mixgrpo pipeline compile` and commit the result")
    assert "mixgrpo-runtime:v" in fresh  # the committed file names the release tag, not a commit


def test_cli_compile_writes_the_yaml_with_a_given_tag(tmp_path: Path) -> None:
    from mixgrpo.cli import main

    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--output", str(out), "--image-tag", "abc123def456"]) == 0
    assert "mixgrpo-runtime:abc123def456" in out.read_text()
    assert main(["pipeline", "submit"]) == 2  # no host: a clear error, not a traceback


def test_layering_library_never_imports_kfp_and_components_import_mixgrpo_in_bodies() -> None:
    def imported(nodes: list[ast.AST]) -> list[str]:
        names = [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
        return [n.split(".")[0] for n in names + [n.module or "" for n in nodes if isinstance(n, ast.ImportFrom)]]

    for path in (REPO / "src" / "mixgrpo").rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert "kfp" not in imported(list(ast.walk(tree))), path
        assert "mixgrpo_pipelines" not in imported(tree.body), f"{path}: import the pipeline layer lazily"
    code = "import sys, mixgrpo.cli, mixgrpo_pipelines.pipelines.steps; print(sorted(m for m in sys.modules if m.startswith('kfp')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # the steps' glue runs in the trainer image without kfp
    for path in (REPO / "components").glob("*.py"):
        if path.name in ("__init__.py", "container_images.py"):
            continue
        top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not [n for n in top if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "mixgrpo"], path


def test_importing_every_library_module_imports_neither_kfp_nor_the_pipeline_layer() -> None:
    """The library is self-contained: every module of ``mixgrpo`` imports without ``kfp`` / ``mixgrpo_pipelines``."""
    code = ("import importlib, json, pkgutil, sys, mixgrpo\n"
            "names = sorted(m.name for m in pkgutil.walk_packages(mixgrpo.__path__, 'mixgrpo.'))\n"
            "for name in names: importlib.import_module(name)\n"
            "layer = sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'mixgrpo_pipelines'))\n"
            "print(json.dumps({'modules': names, 'pipeline_layer': layer}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    library = {"mixgrpo." + ".".join(p.relative_to(REPO / "src" / "mixgrpo").with_suffix("").parts)
               for p in (REPO / "src" / "mixgrpo").rglob("*.py") if p.name != "__init__.py"}
    assert library <= set(found["modules"]), sorted(library - set(found["modules"]))  # every module was imported
    assert found["pipeline_layer"] == [], found["pipeline_layer"]


# --------------------------------------------------------------------------- prepare-prompts


def test_prepare_toy_prompts_by_default(tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    layout = steps.RunLayout(store, "run-1")
    first = steps.prepare_step("", layout.prompts, tmp_path / "report", test_fraction=0.2)
    assert (first.n_train, first.n_test) == (72, 18)
    assert (tmp_path / "report" / "report.md").is_file()
    again = steps.prepare_step("", steps.RunLayout(store, "run-2").prompts, tmp_path / "r2", test_fraction=0.2)
    assert again.dataset_hash == first.dataset_hash  # the data set's identity does not depend on where it went


def test_prepared_prompts_are_keyed_on_the_content_hash(tmp_path: Path) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("a cat\n")
    store = (tmp_path / "store").as_uri()
    first = steps.prompt_source_hash(str(source))
    assert first == steps.prompt_source_hash(source.as_uri()) and len(first) == 64
    assert steps.prompt_source_hash("") == steps.prompt_source_hash(str(steps.toy_prompt_file()))
    uri = steps.prepared_prompts_uri(store, first, seed=0, test_fraction=0.2)
    assert uri == steps.prepared_prompts_uri(store, first, test_fraction=0.2, seed=0) and uri.startswith(f"{store}/prompts/")
    assert uri != steps.prepared_prompts_uri(store, first, seed=1, test_fraction=0.2)  # other settings, other place
    source.write_text("a dog\n")
    assert steps.prompt_source_hash(str(source)) != first  # new data behind the same URI: a new key
    with pytest.raises(steps.StepError, match="expected the sha256 hex digest"):
        steps.prepared_prompts_uri(store, "abc")


@pytest.mark.parametrize("case", ["empty", "duplicates", "wrong_column", "binary", "missing"])
def test_bad_prompt_inputs_fail_naming_the_input_and_publish_nothing(tmp_path: Path, case: str) -> None:
    files = {
        "empty": ("prompts.txt", b""),
        "duplicates": ("prompts.txt", b"a red circle on a blue background\n" * 40),
        "wrong_column": ("prompts.csv", b"text_prompt,id\n" + b"".join(b"prompt number %d,%d\n" % (i, i) for i in range(30))),
        "binary": ("prompts.txt", bytes(range(256)) * 8),
    }
    if case == "missing":
        source = str(tmp_path / "nope" / "prompts.txt")
    else:
        name, data = files[case]
        (tmp_path / name).write_bytes(data)
        source = str(tmp_path / name)
    out = (tmp_path / "store" / "prompts").as_uri()
    with pytest.raises(DataError) as info:
        steps.prepare_step(source, out, tmp_path / "report", column="prompt" if case == "wrong_column" else "")
    message = str(info.value)
    assert source in message
    expected = {"empty": "empty", "duplicates": "duplicate", "wrong_column": "column", "binary": "binary",
                "missing": "does not exist"}[case]
    assert expected in message.lower()
    if case == "duplicates":
        assert isinstance(info.value, PromptValidationError)
        assert "expect_column_values_to_be_unique" in (tmp_path / "report" / "report.md").read_text() or \
               "at least 16" in message
    with pytest.raises(NotFoundError):
        read_manifest(out)


# --------------------------------------------------------------------------- cache-rewards and config


def test_cache_rewards(tmp_path: Path) -> None:
    dest = (tmp_path / "rewards").as_uri()
    assert steps.cache_rewards_step("toy_object_color,toy_shape", "toy_heldout_realism", "", dest) == {}
    with pytest.raises(steps.StepError, match="'no_such_reward'.*known rewards"):
        steps.cache_rewards_step("toy_shape,no_such_reward", "", "", dest)
    with pytest.raises(steps.StepError, match="clip needs weights"):
        steps.cache_rewards_step("clip", "", "", dest)
    src = tmp_path / "clip-src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    options = steps.cache_rewards_step("clip", "", f"clip={src}", dest, "v0")
    assert options == {"clip": {"weights_dir": f"{dest}/clip/v0"}}
    assert {f.path for f in read_manifest(options["clip"]["weights_dir"]).files} == {"config.json", "tokenizer.json"}


def test_one_table_maps_every_pipeline_parameter_and_the_defaults_are_the_configs(compiled: dict) -> None:
    """CONFIG_KEYS covers the pipeline's signature; the train component takes every mapped parameter; the compiled
    defaults are `mixgrpo config`'s; a component declares a default only for an input the DAG does not pass."""
    from mixgrpo.config import load_config
    from mixgrpo_pipelines import components
    from mixgrpo_pipelines.pipelines.mixgrpo_pipeline import mixgrpo_pipeline
    from mixgrpo_pipelines.pipelines.parameters import (CONFIG_KEYS, CONFIG_PARAMETERS, TRAINING_PARAMETERS,
                                                         as_parameter, config_value)

    compiled_params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    signature = list(mixgrpo_pipeline.component_spec.inputs)
    assert list(CONFIG_KEYS) == signature and set(compiled_params) == set(signature), "CONFIG_KEYS vs the signature"
    cfg = load_config()
    for name, key in CONFIG_PARAMETERS.items():
        assert compiled_params[name]["defaultValue"] == as_parameter(config_value(cfg, key)), (name, key)
    train_inputs = components.train.component_spec.inputs
    assert set(TRAINING_PARAMETERS) <= set(train_inputs), set(TRAINING_PARAMETERS) - set(train_inputs)
    assert not [n for n in TRAINING_PARAMETERS if train_inputs[n].default is not None], "defaults live in the config"
    spec = compiled["spec"]
    for task_name, task in _all_tasks(spec).items():  # a component default only for an input the DAG leaves out
        inputs = spec["components"][task["componentRef"]["name"]].get("inputDefinitions", {}).get("parameters", {})
        given = task.get("inputs", {}).get("parameters", {})
        assert not [n for n, p in inputs.items() if "defaultValue" in p and n in given], task_name


def test_train_overrides_set_each_mapped_key_and_leave_preset_keys_at_default_to_the_mode() -> None:
    from mixgrpo.config import flat_config, load_config
    from mixgrpo_pipelines.pipelines.parameters import TRAINING_PARAMETERS

    assert flat_config(steps.build_config(steps.train_overrides())) == {
        **flat_config(load_config()), "progress_bar": False, "eval_every": 37, "checkpoint_every": 0}
    changed = {"model_uri": "/m", "model_kind": "flux", "mode": "mixgrpo-flash", "rewards": "toy_shape,toy_background",
               "reward_weights": "toy_shape=3", "held_out_rewards": "", "window_size": 3, "window_shift_interval": 7,
               "window_strategy": "random", "iterations": 9, "group_size": 6, "prompts_per_iteration": 2,
               "train_batch_size": 4, "learning_rate": 3e-4, "seed": 5, "engine": "ddp", "mlflow_experiment": "x"}
    assert set(changed) == set(TRAINING_PARAMETERS)
    values = steps.train_overrides(**changed)
    assert {values[TRAINING_PARAMETERS[n]] for n in ("window_size", "iterations", "group_size", "seed")} == {3, 9, 6, 5}
    assert values["rewards.names"] == ["toy_shape", "toy_background"] and values["rewards.weights"] == {"toy_shape": 3.0}
    assert values["window.shift_interval"] == 7 and values["optim.lr"] == 3e-4 and values["model.path"] == "/m"
    flash = steps.build_config(steps.train_overrides(mode="mixgrpo-flash"))
    assert flash.window.shift_interval == 20 and flash.sampling.post_ratio == 0.4  # the preset's, not the default 25
    assert steps.build_config(steps.train_overrides(mode="mixgrpo-flash", window_shift_interval=30)).window.shift_interval == 30
    with pytest.raises(steps.StepError, match="not training parameters"):
        steps.train_overrides(iteration=3)


def test_run_local_trains_exactly_the_toy_preset() -> None:
    """The arguments run-local derives from presets/toy.yaml give the train step the preset's config."""
    from mixgrpo.config import flat_config, load_config
    from mixgrpo_pipelines.pipelines.local import TOY_PROCESSES, describe_preset, preset_parameters
    from mixgrpo_pipelines.pipelines.parameters import STEP_OWNED_KEYS, TRAINING_PARAMETERS

    arguments = preset_parameters("toy", {})
    training = {k: v for k, v in arguments.items() if k in TRAINING_PARAMETERS}
    cfg = flat_config(steps.build_config(steps.train_overrides(extra=arguments.get("extra_overrides", ""), **training)))
    toy = flat_config(load_config("toy"))
    assert {k: v for k, v in cfg.items() if k not in STEP_OWNED_KEYS} == {
        k: v for k, v in toy.items() if k not in STEP_OWNED_KEYS}
    assert toy["optim.lr"] != load_config().optim.lr and arguments["learning_rate"] == toy["optim.lr"]
    assert arguments["gpus_per_node"] == TOY_PROCESSES and preset_parameters("toy", {"gpus_per_node": 1})["gpus_per_node"] == 1
    assert preset_parameters("toy", {"iterations": 3, "extra_overrides": "window.size=2"})["iterations"] == 3  # --param wins
    assert preset_parameters("toy", {"extra_overrides": "window.size=2"})["extra_overrides"].endswith("window.size=2")
    assert f"learning_rate={toy['optim.lr']}" in describe_preset("toy") and "toy.yaml" in describe_preset("toy")
    # The evaluate step samples as many seeds per held-out prompt as the trainer's held-out evaluation.
    assert toy["eval_images_per_prompt"] != load_config().eval_images_per_prompt
    assert arguments["eval_images_per_prompt"] == toy["eval_images_per_prompt"]


def test_readme_parameter_table_is_generated_from_the_pipeline() -> None:
    from mixgrpo_pipelines.pipelines.parameters import parameter_table, with_parameter_table

    readme = (REPO / "pipelines" / "README.md").read_text()
    assert with_parameter_table(readme) == readme, ("the parameter table in pipelines/README.md is stale: run "
                                                    "`python -m mixgrpo_pipelines.pipelines.parameters pipelines/README.md`")
    assert "| `iterations` | integer | `300` | `max_iterations` |" in parameter_table()


def test_train_overrides_follow_the_mode_and_extra_wins() -> None:
    cfg = steps.build_config(steps.train_overrides(
        mode="dancegrpo", rewards="toy_shape", held_out_rewards="", reward_weights="toy_shape=2", iterations=3,
        extra="optim.lr=2e-5\nsampling.num_steps=10"))
    assert cfg.window.strategy == "all" and cfg.sampling.sde_type == "dance"  # the preset is kept
    assert cfg.optim.lr == 2e-5 and cfg.sampling.num_steps == 10 and cfg.max_iterations == 3
    assert cfg.rewards.weights == {"toy_shape": 2.0}
    with pytest.raises(steps.StepError, match="unknown reward 'hpsv9'"):
        steps.build_config(steps.train_overrides(rewards="hpsv9"))
    with pytest.raises(steps.StepError, match="reward_weights"):
        steps.train_overrides(rewards="toy_shape", reward_weights="toy_shape")


# --------------------------------------------------------------------------- train, evaluate, register, gate, promote


@pytest.fixture(scope="module")
def tiny_model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random toy model, published like a base model in the object store."""
    import torch

    from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    local = save_toy_model(ToyFlowModel(ToyModelConfig(num_layers=1, num_single_layers=1, num_attention_heads=1,
                                                       attention_head_dim=32)), root / "model")
    uri = (root / "published").as_uri()
    publish_dir(local, uri)
    return uri


def tiny_overrides(model_uri: str, **extra: object) -> dict:
    values = steps.train_overrides(
        model_uri=model_uri, rewards="toy_object_color,toy_background", held_out_rewards="toy_heldout_realism",
        iterations=1, group_size=2, prompts_per_iteration=1, train_batch_size=2,
        extra="sampling.num_steps=6\nwindow.size=2\neval_images_per_prompt=1")
    values.update(extra)
    return values


def test_train_and_evaluate_steps_publish_weights_and_report(tmp_path: Path, tiny_model_uri: str) -> None:
    layout = steps.RunLayout((tmp_path / "store").as_uri(), "run-7")
    prepared = steps.prepare_step("", layout.prompts, tmp_path / "report")
    overrides = tiny_overrides(tiny_model_uri)
    trained = steps.train_step(overrides, prepared.uri, layout, tmp_path / "work")
    assert trained.weights_uri == layout.weights
    files = {f.path for f in read_manifest(trained.weights_uri).files}
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert {f.path for f in read_manifest(trained.metrics_uri).files} == {"metrics.jsonl", "config.yaml"}
    assert len(trained.config_hash) == 12 and trained.iterations == 1

    result = steps.evaluate_step(overrides, trained.weights_uri, prepared.uri, trained.metrics_uri, layout.eval,
                                 tmp_path / "eval", images_per_prompt=1, max_prompts=2)
    metrics = steps.eval_metrics(result)
    assert metrics[steps.GATE_METRIC] == pytest.approx(result.combined["tuned"])
    assert {"toy_object_color", "toy_object_color.base", "toy_object_color.delta", "toy_heldout_realism"} <= set(metrics)
    published = {f.path for f in read_manifest(layout.eval).files}
    assert {"metrics.json", "grid.png", "report.md", "report.html", "rewards.png"} <= published
    md = steps.markdown_report(tmp_path / "eval", layout.eval)
    assert "data:image/png;base64," in md and "| toy_object_color" in md

    with pytest.raises(steps.StepError, match="num_nodes=2 needs executor=kubernetes"):
        steps.train_step(overrides, prepared.uri, layout, tmp_path / "w2", num_nodes=2)
    with pytest.raises(steps.StepError, match="executor='slurm'"):
        steps.train_step(overrides, prepared.uri, layout, tmp_path / "w3", executor="slurm")


def _fake_run(tmp_path: Path, run: str, value: float) -> dict:
    """Published weights + eval report of a pipeline run (what train / evaluate leave behind)."""
    store = (tmp_path / "store").as_uri()
    layout = steps.RunLayout(store, run)
    for sub, names in (("weights", ("transformer/config.json",)), ("eval", ("metrics.json", "grid.png", "report.html"))):
        local = tmp_path / run / sub
        for name in names:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_text("{}")
    publish_dir(tmp_path / run / "weights", layout.weights)
    publish_dir(tmp_path / run / "eval", layout.eval)
    return dict(weights_uri=layout.weights, pipeline_run_id=run, eval_uri=layout.eval, metrics_uri=layout.train_metrics,
                metrics={steps.GATE_METRIC: value, "toy_shape": value, "toy_shape.delta": 0.01},
                config_hash="c0ffee", dataset_hash="d474")


def test_train_step_selects_on_validation_prompts_carved_out_of_training(tmp_path: Path, tiny_model_uri: str) -> None:
    """select_best scores prompts the trainer never trains on: validation.txt is drawn from the prepared training
    prompts and removed from train.txt (before, 11 of the toy validation split's 12 prompts were training prompts)."""
    from mixgrpo.config import load_config
    from mixgrpo.data import load_prepared_prompts
    from mixgrpo.selection import VALIDATION_COUNT

    layout = steps.RunLayout((tmp_path / "store").as_uri(), "run-9")
    prepared = steps.prepare_step("", layout.prompts, tmp_path / "report", test_fraction=0.2)
    steps.train_step(tiny_overrides(tiny_model_uri, select_best=True), prepared.uri, layout, tmp_path / "work")
    job = tmp_path / "work" / "train-job"
    train, validation, test = ((job / f"{s}.txt").read_text().split("\n")[:-1] for s in ("train", "validation", "test"))
    assert len(validation) == VALIDATION_COUNT and not set(validation) & set(train) and not set(validation) & set(test)
    assert sorted(train + validation) == sorted(load_prepared_prompts(prepared.uri, "train"))
    assert load_config(job / "config.yaml").validation_prompts == "validation.txt"
    plain = tmp_path / "plain"
    steps._stage_prompts(prepared.uri, plain)  # without select_best: the prepared splits as they are
    assert not (plain / "validation.txt").exists() and (plain / "train.txt").read_text().count("\n") == 72


def test_register_gate_promote_on_the_embedded_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = dict(tracking_uri=uri, model_name="pipeline-test")
    first = steps.register_step(**common, experiment="e", git_sha="abc", **_fake_run(tmp_path, "run-a", 0.5))
    assert (first.version, first.aliases) == ("1", (CHALLENGER,))
    again = steps.register_step(**common, experiment="e", git_sha="abc", **_fake_run(tmp_path, "run-a", 0.5))
    assert (again.version, again.mlflow_run_id) == ("1", first.mlflow_run_id)  # retry: nothing new

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("pipeline-test", "1")
    assert version.source.endswith("/runs/run-a/train/final")
    assert {"git_sha": "abc", "pipeline_run_id": "run-a", "config_hash": "c0ffee", "dataset_manifest_hash": "d474",
            f"metric.{steps.GATE_METRIC}": "0.5"}.items() <= version.tags.items()
    run = client.get_run(first.mlflow_run_id)
    assert run.data.metrics[steps.GATE_METRIC] == 0.5
    assert {a.path for a in client.list_artifacts(first.mlflow_run_id, "evaluation")} >= {"evaluation/grid.png"}

    gate = lambda v, margin=0.0: steps.gate_step(**common, version=v, gate_margin=margin)  # noqa: E731
    assert gate("1").promote and "no champion" in gate("1").reason
    steps.promote_step(**common, version="1")
    assert steps.model_aliases(uri, "pipeline-test", "1") == [CHAMPION, CHALLENGER] or \
           set(steps.model_aliases(uri, "pipeline-test", "1")) == {CHAMPION, CHALLENGER}

    better = steps.register_step(**common, experiment="e", **_fake_run(tmp_path, "run-b", 0.7))
    assert not gate(better.version, margin=0.5).promote  # within the margin: the champion stays
    assert steps.promote_step(**common, version=better.version, gate_margin=0.5)["promote"] is False
    assert CHAMPION in steps.model_aliases(uri, "pipeline-test", "1")
    assert gate(better.version).promote
    steps.promote_step(**common, version=better.version)
    assert set(steps.model_aliases(uri, "pipeline-test", "2")) == {CHAMPION, CHALLENGER}
    assert client.get_model_version("pipeline-test", "1").tags["demoted_by"] == "2"

    worse = steps.register_step(**common, experiment="e", **_fake_run(tmp_path, "run-c", 0.1))
    assert not gate(worse.version).promote
    assert steps.model_aliases(uri, "pipeline-test", "2") == sorted([CHAMPION])  # challenger moved to v3


def test_register_bad_inputs_leave_nothing_registered(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = dict(tracking_uri=uri, model_name="nothing", experiment="e")
    good = _fake_run(tmp_path, "run-x", 0.5)
    with pytest.raises(RegistryError, match="gate_metric 'hps'"):
        steps.register_step(**common, **good, gate_metric="hps")
    with pytest.raises(RegistryError, match="weights_uri .*nothing was registered"):
        steps.register_step(**common, **{**good, "weights_uri": (tmp_path / "missing").as_uri()})
    with pytest.raises(RegistryError, match="unreachable"):
        steps.register_step(**{**common, "tracking_uri": "http://127.0.0.1:9"}, **good)
    if (tmp_path / "mlflow.db").exists():
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            assert db.execute("select count(*) from model_versions").fetchone() == (0,)
            assert db.execute("select count(*) from runs").fetchone() == (0,)


def test_run_local_parameters_are_typed_and_checked() -> None:
    from mixgrpo_pipelines.pipelines.local import parse_params

    assert parse_params(["iterations=3", "gate_margin=0.5", "mode=dancegrpo"]) == {
        "iterations": 3, "gate_margin": 0.5, "mode": "dancegrpo"}
    with pytest.raises(ValueError, match="NAME one of"):
        parse_params(["iteration=3"])
    with pytest.raises(ValueError, match="expected Integer"):
        parse_params(["iterations=many"])


def test_prepare_precomputes_flux_prompt_embeddings_for_training(tmp_path: Path) -> None:
    """model_kind=flux: prepare-prompts encodes every prompt once; the train step stages that cache."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_flux import save_tiny_flux

    from mixgrpo.models.flux import FluxFlowModel, FluxSettings

    model_dir = save_tiny_flux(tmp_path / "flux")
    source = tmp_path / "prompts.txt"
    prompts = [f"a photo of object number {i}" for i in range(20)]
    source.write_text("\n".join(prompts) + "\n")
    out = steps.prepare_step(str(source), f"file://{tmp_path}/store/prompts", tmp_path / "report", min_prompts=4,
                             test_fraction=0.25, model_uri=str(model_dir), model_kind="flux")
    assert read_manifest(steps.embeddings_uri(out.uri)).files          # published beside the data set
    job = tmp_path / "job"
    assert steps._stage_embeddings(out.uri, job)
    model = FluxFlowModel.from_pretrained(str(model_dir), FluxSettings(height=64, width=64,
                                                                     embedding_cache_dir=str(job / "embeddings")), "cpu")
    model.encode_prompts(prompts[:5])
    assert model.encoder_calls == 0                                     # every prompt came from the cache
    assert not steps._stage_embeddings(f"file://{tmp_path}/store/other", tmp_path / "job2")
    with pytest.raises(steps.StepError, match="needs model_uri"):
        steps.precompute_embeddings_step(out.uri, "")
