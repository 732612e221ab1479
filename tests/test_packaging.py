"""The package as it ships: build the wheel from what the images copy, check what it carries, install
it non-editably into a fresh venv outside the checkout and run the CLI, the engine configs, a tiny
training and the pipeline compiler from there.

The venv reuses this interpreter's installed dependencies (torch, diffusers, kfp, ...): its
site-packages folders (never ``src/`` or the checkout) are listed in a ``.pth`` file. ``.pth`` files
inside those folders are not processed, so an editable ``mixgrpo`` there stays invisible and only
the wheel's copy can be imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from mixgrpo.config import config_to_yaml, load_config
from test_train import tiny_config

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))
ENGINE_FILES = ("accelerate/ddp.yaml", "accelerate/fsdp.yaml", "accelerate/zero2.yaml", "accelerate/zero3.yaml",
                "deepspeed/zero2.json", "deepspeed/zero3.json")

def build_inputs(dockerfile: Path) -> list[str]:
    """The checkout paths a Dockerfile copies into its build context (``COPY a b ./dest``)."""
    sources = []
    for line in re.findall(r"^COPY\s+(?!--)(.+)$", dockerfile.read_text(), re.MULTILINE):
        sources += line.split()[:-1]
    return sources


def source_packages() -> dict[str, Path]:
    """Every package (a folder with ``__init__.py``) of the source tree, by installed name, from
    pyproject's ``packages`` and ``package-dir``."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping, found = setuptools["package-dir"], {}
    for name in setuptools["packages"]:
        root = REPO / mapping[name] if name in mapping else REPO / mapping[""] / Path(*name.split("."))
        for init in root.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found[".".join([name, *init.parent.relative_to(root).parts])] = init.parent
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built (no network) from a copy of exactly what the runtime image copies."""
    tree = tmp_path_factory.mktemp("context")
    for source in build_inputs(REPO / "images" / "runtime" / "Dockerfile"):
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, tree / source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, tree / source)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           str(tree), "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = dist.glob("mixgrpo-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv outside the checkout with the wheel installed (not editable); how to run in it."""
    root = tmp_path_factory.mktemp("outside")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    base = dict.fromkeys(p for p in sys.path if Path(p).name in ("site-packages", "dist-packages"))  # not src/
    (site / "_dependencies.pth").write_text("".join(f"{p}\n" for p in base))
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--ignore-installed", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    env = {"PATH": f"{env_dir / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(root), "PYTHONNOUSERSITE": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions")}
    return {"root": root, "python": python, "site": site, "env": env}


def run(installed: dict, *command: str, timeout: float = 600) -> str:
    """Run ``command`` from outside the checkout in the installed venv; its stdout (fails on a non-zero exit)."""
    done = subprocess.run(list(command), cwd=installed["root"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_every_image_copies_what_the_wheel_is_built_from() -> None:
    needed = set(build_inputs(REPO / "images" / "runtime" / "Dockerfile")) - {"constraints-cpu.txt"}
    assert {"pyproject.toml", "src", "components", "pipelines"} <= needed
    for dockerfile in DOCKERFILES:
        assert needed <= set(build_inputs(dockerfile)), f"{dockerfile} does not copy {needed - set(build_inputs(dockerfile))}"


def test_the_wheel_carries_every_package_and_its_engine_configs_and_nothing_generic(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    assert top == {"mixgrpo", "mixgrpo_pipelines", f"{wheel.name.split('-py')[0]}.dist-info"}, top
    packages = source_packages()
    assert {"mixgrpo", "mixgrpo.toy", "mixgrpo_pipelines.components", "mixgrpo_pipelines.pipelines"} <= set(packages)
    for name, folder in packages.items():
        for module in folder.glob("*.py"):
            assert f"{name.replace('.', '/')}/{module.name}" in names, f"{module} is not in the wheel: list its package in pyproject"
    presets = REPO / "src" / "mixgrpo" / "presets"
    shipped = {f"mixgrpo/presets/{p.relative_to(presets).as_posix()}" for p in presets.rglob("*") if p.is_file()}
    assert {f"mixgrpo/presets/{f}" for f in ENGINE_FILES} | {"mixgrpo/presets/toy.yaml"} <= shipped <= names
    assert "mixgrpo_pipelines/pipelines/mixgrpo_pipeline.yaml" in names
    base = REPO / "src" / "mixgrpo" / "toy" / "base"  # the shipped toy base model, every file of it
    assert {f"mixgrpo/toy/base/{p.relative_to(base).as_posix()}" for p in base.rglob("*") if p.is_file()} <= names


@pytest.mark.slow
def test_installed_package_imports_from_the_venv_only(installed: dict) -> None:
    code = ("import importlib.util, json, mixgrpo, mixgrpo_pipelines.pipelines.cluster as c; "
            "print(json.dumps([mixgrpo.__file__, c.__file__, importlib.util.find_spec('components'), "
            "importlib.util.find_spec('pipelines'), str(c.PIPELINE_YAML), c.PIPELINE_YAML.is_file()]))")
    library, pipeline, components, pipelines, compiled, exists = json.loads(run(installed, str(installed["python"]), "-c", code))
    assert Path(library).is_relative_to(installed["site"]) and Path(pipeline).is_relative_to(installed["site"])
    assert components is None and pipelines is None  # nothing generic at the top of site-packages
    assert Path(compiled).is_relative_to(installed["site"]) and exists
    help_text = run(installed, "mixgrpo", "--help")
    for verb in ("train", "config", "launch", "run-local", "pipeline"):
        assert verb in help_text


@pytest.mark.slow
def test_installed_cli_resolves_the_toy_preset_and_every_engine_config(installed: dict) -> None:
    assert run(installed, "mixgrpo", "config", "--config", "toy") == config_to_yaml(load_config("toy"))
    for stage in (2, 3):
        printed = yaml.safe_load(run(installed, "mixgrpo", "config", "--config", "toy", "distributed.engine=deepspeed",
                                     f"distributed.zero_stage={stage}", "optim.ema_decay=0"))  # EMA: none / ddp only
        assert printed["distributed"]["engine"] == "deepspeed" and printed["distributed"]["zero_stage"] == stage
    code = """if True:
        import json
        from accelerate.commands.config.config_args import load_config_from_file
        from mixgrpo.config import load_config
        from mixgrpo.distributed import ENGINES, accelerate_config, deepspeed_config
        out = {}
        for stage in (2, 3):
            cfg = load_config("toy", ["distributed.engine=deepspeed", f"distributed.zero_stage={stage}", "optim.ema_decay=0"])
            out[f"deepspeed-zero{stage}"] = deepspeed_config(cfg)["zero_optimization"]["stage"]
            path = accelerate_config("deepspeed", stage)
            out[f"accelerate-zero{stage}"] = [str(path), str(load_config_from_file(str(path)).distributed_type)]
        for engine in ENGINES:
            path = accelerate_config(engine)
            out[f"accelerate-{engine}"] = [str(path), str(load_config_from_file(str(path)).distributed_type)]
        print(json.dumps(out))
    """
    resolved = json.loads(run(installed, str(installed["python"]), "-c", code))
    assert resolved["deepspeed-zero2"] == 2 and resolved["deepspeed-zero3"] == 3
    expected = {"accelerate-zero2": "DEEPSPEED", "accelerate-zero3": "DEEPSPEED", "accelerate-none": "MULTI_GPU",
                "accelerate-ddp": "MULTI_GPU", "accelerate-fsdp": "FSDP", "accelerate-deepspeed": "DEEPSPEED"}
    for key, kind in expected.items():
        path, distributed_type = resolved[key]
        assert Path(path).is_relative_to(installed["site"]) and distributed_type.endswith(kind), (key, path, distributed_type)


@pytest.mark.slow
def test_installed_cli_trains_a_tiny_model(installed: dict) -> None:
    root, python = installed["root"], str(installed["python"])
    model = root / "tiny-model"
    run(installed, python, "-c", "import sys, torch; from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model; "
        "torch.manual_seed(0); save_toy_model(ToyFlowModel(ToyModelConfig(num_layers=1, num_single_layers=1, "
        "num_attention_heads=1, attention_head_dim=32)), sys.argv[1])", str(model))
    config = root / "tiny.yaml"  # tests/test_train.py's tiny run, 2 iterations
    config.write_text(config_to_yaml(tiny_config(model, root / "run", max_iterations=2)))
    run(installed, "mixgrpo", "train", "--config", str(config))
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2]
    assert (root / "run" / "final" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_installed_pipeline_compiles_to_the_committed_yaml(installed: dict) -> None:
    out = installed["root"] / "pipeline.yaml"
    run(installed, "mixgrpo", "pipeline", "compile", "--output", str(out))
    assert out.read_text() == (REPO / "pipelines" / "mixgrpo_pipeline.yaml").read_text()
