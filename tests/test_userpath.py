"""The user's path after training: `mixgrpo sample` from every kind of model source (issue 11)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mixgrpo import cli

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
                     "rewards.names=[toy_object_color,toy_background]", "rewards.held_out=[toy_heldout_realism]"])
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
