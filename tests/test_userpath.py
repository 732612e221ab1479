"""The user's path after training: `mixgrpo sample` from every kind of model source (issue 11)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mixgrpo import cli
from mixgrpo.toy.pretrain import shipped_base_label

PROMPT = "a red circle on a black background"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mixgrpo train` on a tiny toy base for 2 iterations: its OUTPUT_DIR."""
    from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model

    root = tmp_path_factory.mktemp("userpath")
    torch.manual_seed(0)
    base = save_toy_model(ToyFlowModel(ToyModelConfig(num_layers=1, num_single_layers=1, num_attention_heads=1,
                                                      attention_head_dim=32)), root / "base")
    out = root / "run"
    code = cli.main(["train", f"model.path={base}", f"output_dir={out}", "max_iterations=2", "sampling.num_steps=6",
                     "window.size=2", "sampling.group_size=2", "prompts_per_iteration=1", "optim.train_batch_size=2",
                     "eval_images_per_prompt=2", "checkpoint_every=0", "progress_bar=false",
                     "rewards.names=[toy_object_color,toy_background]", "rewards.held_out=[toy_heldout_realism]",
                     f"mlflow_tracking_uri=sqlite:///{root / 'mlflow.db'}", "mlflow_experiment=userpath", "eval_every=1"])
    assert code == 0
    return out


def sample(args: list[str]) -> int:
    return cli.main(["sample", "sampling.num_steps=6", *args])


def test_final_weights_carry_their_model_card_and_base(trained: Path) -> None:
    final = trained / "final"
    info = json.loads((final / "mixgrpo_model.json").read_text())
    assert info["model_kind"] == "toy" and info["weights"] == "transformer" and info["config"]["max_iterations"] == 2
    assert (final / "toy_model.json").is_file() and (final / "text_encoder" / "model.safetensors").is_file()
    card = (final / "README.md").read_text()
    assert "Base model" in card and "Apache-2.0" in card and "toy_object_color" in card and "| toy_heldout_realism | held-out |" in card


def test_sample_from_a_directory_a_file_uri_and_the_registry(trained: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from mixgrpo.registry import CHAMPION, register_model

    final = trained / "final"
    assert sample(["--model", str(final), "--prompt", PROMPT, "--prompt", "a blue square on a white background",
                   "--seeds", "0-2", "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "dir")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 32 * 3
    index = [json.loads(line) for line in (tmp_path / "dir" / "index.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in index] == [0, 1, 2, 0, 1, 2] and index[3]["prompt"].startswith("a blue square")
    direct = (tmp_path / "dir" / index[1]["file"]).read_bytes()

    assert sample(["--model", final.as_uri(), "--prompt", PROMPT, "--seeds", "1", "--out-dir", str(tmp_path / "uri")]) == 0
    assert (tmp_path / "uri" / "p000_s1.png").read_bytes() == direct

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = register_model(client, "mixgrpo-dit", final.as_uri(), pipeline_run_id="run-1")
    client.set_registered_model_alias("mixgrpo-dit", CHAMPION, version.version)
    for source in ("models:/mixgrpo-dit@champion", f"models:/mixgrpo-dit/{version.version}"):
        out = tmp_path / source.replace("/", "_").replace(":", "_").replace("@", "_")
        assert sample(["--model", source, "--mlflow", tracking, "--prompt", PROMPT, "--seeds", "1", "--out-dir", str(out)]) == 0
        assert (out / "p000_s1.png").read_bytes() == direct, source


def test_sample_errors_name_the_source(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert sample(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g.png")]) == 2
    assert "nowhere is not a directory" in capsys.readouterr().err
    assert sample(["--model", "models:/mixgrpo-dit@champion"]) == 2
    assert "give --mlflow URI or set MLFLOW_TRACKING_URI" in capsys.readouterr().err
    assert sample(["--model", "models:/absent@champion", "--mlflow", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "models:/absent@champion: not found in the registry" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert sample(["--model", str(tmp_path / "empty")]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert sample(["--model", str(trained / "final"), "--seeds", "a-b"]) == 2
    assert "--seeds 'a-b'" in capsys.readouterr().err


def test_training_logs_every_iteration_to_mlflow_while_it_runs(trained: Path) -> None:
    from mlflow import MlflowClient

    tracking = f"sqlite:///{trained.parent / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("userpath").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim/lr"] and run.data.params["git_sha"] and run.data.params["max_iterations"] == "2"
    history = client.get_metric_history(run.info.run_id, "train/reward/toy_object_color")
    assert [m.step for m in history] == [1, 2]
    held = client.get_metric_history(run.info.run_id, "eval/held_out/toy_heldout_realism")
    assert sorted(m.step for m in held) == [0, 1, 2]  # before training, after iteration 1, the final one
    assert [m.timestamp for m in sorted(held, key=lambda m: m.timestamp)] == sorted(m.timestamp for m in held)
    assert held[-1].timestamp > held[0].timestamp  # logged as training went, not in one batch at the end
    metrics = (trained / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 + 2 + 1


def test_mlflow_metric_names_are_slash_separated() -> None:
    from mixgrpo.tracking import mlflow_metrics

    record = {"iteration": 3, "rewards": {"toy_shape": {"mean": 0.5, "std": 0.1}}, "held_out": {"toy_shape": 0.4},
              "approx_kl": 0.01, "seconds": {"total": 1.5}, "final": True, "loss": float("nan")}
    assert mlflow_metrics(record) == {"train/reward/toy_shape": 0.5, "train/reward_std/toy_shape": 0.1,
                                      "eval/held_out/toy_shape": 0.4, "train/approx_kl": 0.01, "train/seconds/total": 1.5}


def test_progress_lines_and_the_step_console(tmp_path: Path) -> None:
    import io
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mixgrpo.console import CONSOLE_MARK, duration, progress_line
    from mixgrpo_pipelines.pipelines.local import StepConsole

    assert (duration(75), duration(3700), duration(5)) == ("1m15s", "1h01m", "5s")
    line = progress_line({"iteration": 20, "rewards": {"toy_shape": {"mean": 0.3314}}, "approx_kl": 0.0012}, 80, 2.0)
    assert line == "iter 20/80  shape 0.331  kl 1.2e-03  2.00 s/it  ETA 2m00s"
    held = progress_line({"iteration": 20, "rewards": {}, "held_out": {"heldout_diversity": 0.05}}, 80, 1.0)
    assert held.endswith("| held-out diversity 0.050")
    screen = io.StringIO()
    with pytest.raises(RuntimeError), StepConsole(tmp_path / "logs", echo=screen):
        print("12:00:00.000 - INFO - Executing task \x1b[96m'train'\x1b[0m")
        print('    {"executor": "input json noise"}')
        print(f"    {CONSOLE_MARK}iter 1/2  toy_shape 0.300")
        print(f"    {CONSOLE_MARK}held-out shape 0.310")
        print(f"    {CONSOLE_MARK}2 iterations, weights file:///w")
        print("12:00:01.000 - INFO - Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
        for attempt in range(2):  # a retried step
            print("Executing task 'evaluate'")
            print("Traceback (most recent call last):")
            print(f"    mixgrpo_pipelines.pipelines.steps.StepError: boom {attempt}")
            print("Task 'evaluate' finished with status FAILURE")
        raise RuntimeError("Task 'evaluate' finished with status FAILURE")
    shown = screen.getvalue().splitlines()
    assert shown[0] == "     train: iter 1/2  toy_shape 0.300"
    assert shown[1] == "     train: held-out shape 0.310"
    assert shown[2].startswith("ok   train") and shown[2].endswith("2 iterations, weights file:///w")
    assert shown[3].startswith("FAIL evaluate") and shown[3].endswith("mixgrpo_pipelines.pipelines.steps.StepError: boom 0")
    assert shown[4].endswith("StepError: boom 1") and shown[5] == "     | Executing task 'evaluate'"
    assert "     |     mixgrpo_pipelines.pipelines.steps.StepError: boom 1" in shown  # the failed step's log, once, at the end
    assert shown[-1] == f"     full log of evaluate: {tmp_path / 'logs' / 'evaluate.log'}"
    assert "input json noise" not in screen.getvalue()
    assert "input json noise" in (tmp_path / "logs" / "train.log").read_text()
    assert "StepError: boom 1" in (tmp_path / "logs" / "evaluate.log").read_text()
    assert "input json noise" in (tmp_path / "logs" / "pipeline.log").read_text()


# --------------------------------------------------------------------------- FLUX: sample and the README's diffusers snippet


def readme_block(language: str, containing: str) -> str:
    """The README's first ```language block that contains ``containing``."""
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for block in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S):
        if containing in block:
            return block
    raise AssertionError(f"README.md has no ```{language} block with {containing!r}")


@pytest.mark.parametrize("lora", [False, True])
def test_flux_weights_sample_and_load_with_plain_diffusers(tmp_path: Path, lora: bool) -> None:
    """What the trainer writes for FLUX (full or LoRA + mixgrpo_model.json) samples with `mixgrpo sample`
    and loads with the README's FluxPipeline snippet."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_flux import save_tiny_flux

    from mixgrpo.config import load_config
    from mixgrpo.model_card import write_model_files
    from mixgrpo.models.flux import FluxFlowModel, FluxSettings

    base = save_tiny_flux(tmp_path / "flux-base")
    sizes = {"model.height": 64, "model.width": 64, "model.max_sequence_length": 16}
    cfg = load_config(overrides={"model.kind": "flux", "model.path": str(base), "model.lora_rank": 2 if lora else 0,
                                 **sizes, "rewards.names": ["toy_background"], "rewards.held_out": []})
    model = FluxFlowModel.from_pretrained(base, FluxSettings(height=64, width=64, max_sequence_length=16,
                                                             lora_rank=2 if lora else 0))
    with torch.no_grad():  # move the weights so tuned != base
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    final = model.save_pretrained(tmp_path / "final")
    write_model_files(final, cfg, {"toy_background": 0.5}, {"toy_background": 0.6})
    info = json.loads((final / "mixgrpo_model.json").read_text())
    assert info["base_model"] == str(base) and info["weights"] == ("lora" if lora else "transformer")
    assert "FLUX.1 [dev] Non-Commercial License" in (final / "README.md").read_text()

    assert sample(["--model", str(final), "--prompt", "a red cat", "--seeds", "0", "--out-dir", str(tmp_path / "s")]) == 0
    assert Image.open(tmp_path / "s" / "p000_s0.png").size == (64, 64)

    snippet = readme_block("python", "FluxPipeline.from_pretrained")
    snippet = (snippet.replace('"black-forest-labs/FLUX.1-dev"', repr(str(base)))
               .replace('"final/transformer"', repr(str(final / "transformer")))
               .replace('"final"', repr(str(final))).replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32")
               .replace("num_inference_steps=25", "num_inference_steps=2, height=64, width=64, max_sequence_length=16"))
    if lora:  # the README's LoRA variant: its commented line instead of the transformer swap
        snippet = "\n".join(line.replace("# pipe.load_lora_weights", "pipe.load_lora_weights")
                            for line in snippet.splitlines() if "FluxTransformer2DModel.from_pretrained" not in line)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    pipe = scope["pipe"]
    tuned_params = dict(model.module.named_parameters())
    if lora:
        import re

        loaded = {re.sub(r"\.default_\d+\.", ".default.", n): p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
        assert len(loaded) == len([n for n in tuned_params if "lora_" in n])
        assert all(torch.allclose(p, tuned_params[n]) for n, p in loaded.items())
    else:
        assert all(torch.equal(p, tuned_params[n]) for n, p in pipe.transformer.named_parameters())
    assert scope["image"].size == (64, 64)


# --------------------------------------------------------------------------- the README's commands


def readme_commands() -> list[str]:
    """Every `mixgrpo ...` line of the README's bash blocks (continuations joined, comments cut), except
    the one-line summaries of alternatives (`a | b`, `[--flag]`, `...`)."""
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            command = line[line.find("mixgrpo "):] if "mixgrpo " in line else ""
            if command and not any(t in command for t in (" | ", "|", "...", "[", "DIR s3://")):
                out.append(line.rstrip("'"))  # a command quoted inside `sh -c '...'` ends with the quote
    return out


def test_every_readme_command_parses() -> None:
    import shlex

    commands = readme_commands()
    assert len(commands) >= 12
    parser = cli.build_parser()
    for line in commands:
        argv = shlex.split(line[line.find("mixgrpo "):])[1:]
        shell = [i for i, token in enumerate(argv) if token in (">", ">>", "&&", "||", "|", ";", "2>&1")]
        argv = argv[:shell[0]] if shell else argv  # a shell redirection or chain ends the mixgrpo command
        args, extra = parser.parse_known_args(argv)
        assert all("=" in item and not item.startswith("-") for item in extra), (line, extra)
        assert getattr(args, "func", None), line


RUNNABLE = ("train", "config", "evaluate", "sample", "publish", "rewards list", "pipeline compile")
"""README subcommands run by the test below; bench / launch / run-local / toy pretrain / submit have their own
tests (minutes each, or a cluster) and are only parsed here."""


def test_readme_commands_run_on_tiny_settings(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's train / config / evaluate / sample / publish lines, as written, in order, on a tiny
    toy base (tiny-size overrides appended, s3:// swapped for file://)."""
    import shlex

    from mlflow import MlflowClient

    from mixgrpo.registry import CHAMPION, register_model

    repo = Path(__file__).resolve().parent.parent
    base = json.loads((trained / "final" / "mixgrpo_model.json").read_text())["config"]["model"]["path"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text(PROMPT + "\na green triangle on a white background\n")
    (tmp_path / "flux-dev").mkdir()  # stands in for the FLUX download in the publish line
    (tmp_path / "flux-dev" / "model_index.json").write_text("{}")
    db = tmp_path / "runs" / "local" / "mlflow.db"
    db.parent.mkdir(parents=True)
    tracking = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = register_model(client, "mixgrpo-dit", (trained / "final").as_uri(), pipeline_run_id="run-1")
    client.set_registered_model_alias("mixgrpo-dit", CHAMPION, version.version)
    tiny = ["sampling.num_steps=6", f"eval_prompts={tmp_path / 'prompts.txt'}"]
    tiny_train = [f"model.path={base}", "window.size=2", "sampling.group_size=2", "prompts_per_iteration=1",
                  "optim.train_batch_size=2", "max_iterations=1", "eval_images_per_prompt=2", "eval_every=0",
                  "checkpoint_every=1", "progress_bar=false"]
    ran = []
    for line in readme_commands():
        env, _, command = line.partition("mixgrpo ")
        if not command.startswith(RUNNABLE) or "pipeline submit" in command:
            continue
        command = (command.replace("configs/toy.yaml", str(repo / "configs" / "toy.yaml")).replace("$PWD", str(tmp_path))
                   .replace("s3://bucket/", (tmp_path / "bucket").as_uri() + "/"))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for assignment in shlex.split(env):
            key, value = assignment.split("=", 1)
            monkeypatch.setenv(key, value.replace("$PWD", str(tmp_path)))
        argv = shlex.split(command)
        if argv[0] in ("train", "config", "evaluate"):
            argv += tiny + tiny_train
        elif argv[0] == "sample":
            argv += [*tiny, "--max-prompts", "2"]
        elif argv[:2] == ["pipeline", "compile"]:
            argv += ["--output", str(tmp_path / "pipeline.yaml")]
        assert cli.main(argv) == 0, line
        ran.append(argv[0])
    assert {"train", "config", "evaluate", "sample", "publish"} <= set(ran) and ran.count("sample") >= 5
    assert (tmp_path / "runs" / "toy-mixgrpo" / "final" / "mixgrpo_model.json").is_file()
    assert (tmp_path / "runs" / "toy-mixgrpo" / "eval" / "report.html").is_file()
    assert {"grid.png", "champion.png", "v1.png", "samples"} <= {p.name for p in tmp_path.iterdir()}
    assert len((tmp_path / "samples" / "index.jsonl").read_text().splitlines()) == 2 * 4
    assert (tmp_path / "bucket" / "models" / "flux-dev" / "MANIFEST.json").is_file()


def test_run_local_json_summary(trained: Path, tmp_path: Path) -> None:
    """`run-local --json`'s object (issue 10.5) from a real evaluation of the tiny trained model."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mixgrpo.config import load_config
    from mixgrpo.evaluate import evaluate
    from mixgrpo_pipelines.pipelines.local import LocalRunResult, summary, summary_json

    cfg = load_config(str(trained / "config.yaml"))
    result = evaluate(cfg, trained / "final", tmp_path / "eval", prompts=[PROMPT, "a green triangle on a white background"],
                      images_per_prompt=4)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    run = LocalRunResult("file:///w/final", "3", ["challenger"], "1", "file:///w/eval", tmp_path / "eval", metrics, 12.0,
                         {"mlflow_tracking_uri": "sqlite:///m.db"}, tmp_path / "logs")
    out = json.loads(json.dumps(summary_json(run)))
    assert set(out) == {"weights_uri", "model_name", "model_version", "aliases", "report", "rewards", "combined", "diversity"}
    assert (out["model_name"], out["model_version"], out["aliases"]) == ("mixgrpo-dit", "3", ["challenger"])
    assert {n: r["kind"] for n, r in out["rewards"].items()} == {
        "toy_object_color": "optimised", "toy_background": "optimised", "toy_heldout_realism": "held_out"}
    for name, reward in out["rewards"].items():
        assert reward["delta"] == pytest.approx(reward["tuned"] - reward["base"])
        assert reward["delta_ci95"][0] <= reward["delta"] <= reward["delta_ci95"][1]
    c = out["combined"]
    assert c["base"] == pytest.approx((out["rewards"]["toy_object_color"]["base"] + out["rewards"]["toy_background"]["base"]) / 2)
    assert c["gap_closed"] == pytest.approx((c["tuned"] - c["base"]) / (1.0 - c["base"]))
    assert out["diversity"] == {"base": result.base["heldout_diversity"], "tuned": result.tuned["heldout_diversity"]}
    text = summary(run)
    assert "delta 95% CI" in text and "mixgrpo sample --model file:///w/final" in text and str(tmp_path / "logs") in text
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "**" not in html and html.count("<img") == 2 * 2 * 4 + (1 if (tmp_path / "eval" / "rewards.png").is_file() else 0)


def test_register_attaches_to_the_training_run_and_tags_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The train step's MLflow run gets the evaluation; the version links to it; its tags are provenance."""
    from mlflow import MlflowClient

    from mixgrpo_pipelines.pipelines import steps
    from mixgrpo.storage import publish_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    layout = steps.RunLayout((tmp_path / "store").as_uri(), "run-9")
    run_id = steps.start_tracking(uri, "e", "run-9", git_sha="abc123")
    assert run_id and steps.start_tracking(uri, "e", "run-9") == run_id  # a retried train step: the same run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert steps.start_tracking("", "e", "run-9") == ""  # no tracking configured: training runs untracked
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.log_metric(run_id, "train/reward/toy_shape", 0.3, step=1)  # what the trainer logs live
    for sub, name in (("weights", "transformer/config.json"), ("eval", "metrics.json")):
        (tmp_path / sub / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / name).write_text("{}")
    publish_dir(tmp_path / "weights", layout.weights)
    publish_dir(tmp_path / "eval", layout.eval)
    params = steps.train_overrides(mode="mixgrpo", iterations=12, learning_rate=5e-5)
    out = steps.register_step(tracking_uri=uri, model_name="m", experiment="e", weights_uri=layout.weights,
                              pipeline_run_id="run-9", metrics={steps.GATE_METRIC: 0.7, "toy_shape": 0.4},
                              eval_uri=layout.eval, metrics_uri=layout.train_metrics, git_sha="abc123",
                              params=params, mlflow_run_id=run_id)
    assert out.mlflow_run_id == run_id
    run = client.get_run(run_id)
    assert run.data.metrics["eval/toy_shape"] == 0.4 and run.data.metrics["train/reward/toy_shape"] == 0.3
    assert run.info.status == "FINISHED" and run.data.tags["git_sha"] == "abc123"
    version = client.get_model_version("m", out.version)
    assert version.run_id == run_id
    assert [k for k in version.tags if k.startswith("metric.")] == [f"metric.{steps.GATE_METRIC}"]
    assert {"mode": "mixgrpo", "iterations": "12", "learning_rate": "5e-05", "base_model": shipped_base_label(),
            "git_sha": "abc123", "pipeline_run_id": "run-9"}.items() <= version.tags.items()


@pytest.mark.integration
def test_sample_from_s3(trained: Path, tmp_path: Path, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model s3://...` (a real S3 server): fetched into the cache, checked, the same images as the directory."""
    from mixgrpo.storage import publish_dir

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3_server.bucket}/userpath/final"
    publish_dir(trained / "final", uri)
    assert sample(["--model", uri, "--prompt", PROMPT, "--seeds", "1", "--out-dir", str(tmp_path / "s3")]) == 0
    assert sample(["--model", str(trained / "final"), "--prompt", PROMPT, "--seeds", "1", "--out-dir", str(tmp_path / "d")]) == 0
    assert (tmp_path / "s3" / "p000_s1.png").read_bytes() == (tmp_path / "d" / "p000_s1.png").read_bytes()
    assert any((tmp_path / "cache" / "models").iterdir())
    assert sample(["--model", f"s3://{s3_server.bucket}/userpath/absent"]) == 2
