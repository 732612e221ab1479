"""Several processes (gloo, CPU): same weights as one process, rewards gathered by group, a dead rank fails fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.config import ConfigError, load_config
from mixgrpo.distributed import Shard, World, launch_command, rank_slice, shard_for
from mixgrpo.grpo import group_advantages_with_stats
from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model
from mixgrpo.checkpoint import checkpoint_dirs
from mixgrpo.train import micro_batches, train

TINY = ToyModelConfig(num_layers=1, num_single_layers=1, num_attention_heads=1, attention_head_dim=32)
ITERATIONS = 3
# One optimiser step sees 4 samples: 2 of each group. One process: 2 groups, accumulation 2;
# two processes: 1 group each, accumulation 1, gradients averaged by the engine.
COMMON = {
    "max_iterations": ITERATIONS, "sampling.group_size": 4, "sampling.num_steps": 6, "window.size": 2,
    "window.shift_interval": 1, "optim.train_batch_size": 2, "optim.lr": 1e-3, "checkpoint_every": 1,
    "eval_images_per_prompt": 1, "progress_bar": False,
    "rewards.names": ["toy_object_color", "toy_background"], "rewards.held_out": ["toy_heldout_realism"],
}
ONE_PROCESS = {"prompts_per_iteration": 2, "optim.gradient_accumulation_steps": 2}
PER_RANK = {"prompts_per_iteration": 1, "optim.gradient_accumulation_steps": 1, "distributed.timeout_s": 30}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_toy_model(ToyFlowModel(TINY), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("one") / "run"
    train(load_config(overrides={**COMMON, **ONE_PROCESS, "model.path": str(tiny_model_dir), "output_dir": str(output)}))
    return output


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    moved = max(float((a[k] - base[k]).abs().max()) for k in a)
    assert moved > 1e-3, "training did not move the weights; the comparison would prove nothing"
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"2-process weights differ from the 1-process run by up to {worst:.3g}"


def overrides(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def launch(engine: str, output_dir: Path, model_dir: Path, *extra: str, **popen) -> subprocess.Popen:
    args = overrides({**COMMON, **PER_RANK, "model.path": str(model_dir), "output_dir": str(output_dir)})
    command = [sys.executable, "-m", "mixgrpo.cli", "launch", "--engine", engine, "--nproc-per-node", "2",
               "--", "train", *args, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


# --------------------------------------------------------------------------- single-process units


def test_launch_command_reads_the_kubeflow_trainer_variables():
    env = {"PET_NNODES": "4", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400",
           "PET_NPROC_PER_NODE": "8"}
    command = launch_command(["train", "--config", "c.yaml"], engine="fsdp", env=env)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    for flag in ("--nproc-per-node=8", "--nnodes=4", "--node-rank=2", "--master-addr=job-node-0-0.job", "--master-port=29400"):
        assert flag in command
    assert "--standalone" not in command
    assert command[-5:] == ["mixgrpo.cli", "train", "--config", "c.yaml", "distributed.engine=fsdp"]
    local = launch_command(["train"], nproc_per_node="2", env={})
    assert "--standalone" in local and "--nproc-per-node=2" in local
    acc = launch_command(["train"], engine="deepspeed", launcher="accelerate", env=env)
    assert acc[acc.index("--num_processes") + 1] == "32" and acc[acc.index("--machine_rank") + 1] == "2"
    assert Path(acc[acc.index("--config_file") + 1]).is_file()
    with pytest.raises(ValueError, match="expected `train ...` after `--`"):
        launch_command(["--config", "c.yaml"], env={})


def test_rank_slices_share_the_prompts_evenly_in_order():
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    shares = [rank_slice(prompts, World(rank=r, world_size=2)) for r in range(2)]
    assert shares == [["p0", "p1", "p2"], ["p3", "p4", "p4"]]  # equal work; the last prompt pads the last share
    assert [rank_slice(prompts, World(rank=r, world_size=3)) for r in range(3)] == [["p0", "p1"], ["p2", "p3"], ["p4", "p4"]]
    assert rank_slice(prompts, World()) == prompts
    assert rank_slice([], World(rank=1, world_size=2)) == []


def test_shards_name_global_groups():
    cfg = load_config(overrides={"prompts_per_iteration": 2, "sampling.group_size": 4})
    assert shard_for(cfg, World(rank=1, world_size=2)) == Shard((2, 3), range(0, 4))
    split = load_config(overrides={"prompts_per_iteration": 2, "sampling.group_size": 4, "distributed.split_groups": True})
    assert shard_for(split, World(rank=1, world_size=2)) == Shard((0, 1), range(2, 4))
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        shard_for(split, World(rank=0, world_size=3))


def test_optimizer_steps_see_the_same_samples_for_any_process_count():
    """Step j of one process (2 groups, accumulation 2) = step j of rank 0 + step j of rank 1 (1 group each)."""
    one = load_config(overrides={**COMMON, **ONE_PROCESS})
    per_rank = load_config(overrides={**COMMON, **PER_RANK})
    single = micro_batches(one, Shard((0, 1), range(4)), iteration=5)
    ranks = [micro_batches(per_rank, Shard((r,), range(4)), iteration=5) for r in range(2)]
    assert len(single) == 4 and all(len(r) == 2 for r in ranks)
    for step in range(2):
        rows_single = sorted(torch.cat([rows for rows, _ in single[2 * step:2 * step + 2]]).tolist())
        rows_ranks = sorted(torch.cat([ranks[r][step][0] + 4 * r for r in range(2)]).tolist())   # rank r's rows follow rank 0's
        assert rows_single == rows_ranks
        assert single[2 * step][1].initial_seed() == ranks[0][step][1].initial_seed()
    assert sorted(torch.cat([rows for rows, _ in single]).tolist()) == list(range(8))       # every sample once


# --------------------------------------------------------------------------- several processes

GATHER_WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from mixgrpo.distributed import World, gather_group_advantages, score_on_rank0
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    world = World(rank=rank, world_size=2)
    spec = json.loads(sys.argv[1])
    mine = spec["ranks"][rank]
    rewards = {name: torch.tensor(values[rank], dtype=torch.float32) for name, values in spec["rewards"].items()}
    advantages, stats, gathered = gather_group_advantages(world, rewards, torch.tensor(mine), optimised=["a", "b"],
                                                          weights={"a": 3.0, "b": 1.0})
    images = torch.full((len(mine), 3, 2, 2), float(rank + 1))
    scorers = {"mean": lambda im, prompts: im.mean(dim=(1, 2, 3)) * torch.tensor([float(len(p)) for p in prompts])} if rank == 0 else {}
    scored = score_on_rank0(world, scorers, ["mean"], images, ["x" * (rank + 1)] * len(mine))
    json.dump({"advantages": advantages.tolist(), "gathered": {k: v.tolist() for k, v in gathered.items()},
               "scored": scored["mean"].tolist()}, open(spec["out"] + f"/rank{rank}.json", "w"))
    dist.destroy_process_group()
""")


@pytest.mark.integration
def test_groups_spread_over_ranks_get_the_one_process_advantages(tmp_path):
    """Group 0 has samples on both ranks, group 1 only on rank 0, group 2 only on rank 1; a failed (NaN) score is masked."""
    nan = float("nan")
    spec = {"out": str(tmp_path), "ranks": [[0, 0, 1, 1, 1], [2, 0, 2, 2, 0]],
            "rewards": {"a": [[0.1, 0.5, 0.3, 0.9, 0.2], [1.0, 0.7, 0.0, 2.0, nan]],
                        "b": [[5.0, 4.0, 3.0, 1.0, 2.0], [0.0, 1.0, 3.0, 3.0, 2.0]],
                        "held_out": [[1.0] * 5, [2.0] * 5]}}
    (tmp_path / "worker.py").write_text(GATHER_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(tmp_path / "worker.py"), json.dumps(spec)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    flat = {name: torch.tensor(values[0] + values[1]) for name, values in spec["rewards"].items() if name != "held_out"}
    expected, _ = group_advantages_with_stats(flat, torch.tensor(spec["ranks"][0] + spec["ranks"][1]), weights={"a": 3.0, "b": 1.0})
    got = torch.tensor(results[0]["advantages"] + results[1]["advantages"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert results[0]["gathered"]["held_out"] == results[1]["gathered"]["held_out"] == [1.0] * 5 + [2.0] * 5
    assert results[0]["scored"] == [1.0] * 5 and results[1]["scored"] == [4.0] * 5      # rank 0 scored rank 1's images


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("engine, extra", [
    ("ddp", []),
    ("fsdp", ["distributed.reward_ranks=rank0", "model.gradient_checkpointing=true"]),
    ("deepspeed", ["distributed.zero_stage=2"]),
    ("deepspeed", ["distributed.zero_stage=3"]),
], ids=["ddp", "fsdp-rank0-rewards-checkpointing", "deepspeed-zero2", "deepspeed-zero3"])
def test_two_processes_end_with_the_one_process_weights(tiny_model_dir, one_process_run, tmp_path, engine, extra):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="pip install -e '.[distributed]'")
    run = launch(engine, tmp_path / engine, tiny_model_dir, *extra)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    base = load_file(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert_same_weights(final_weights(one_process_run), final_weights(tmp_path / engine), base)
    assert (tmp_path / engine / "final" / "transformer" / "config.json").is_file()
    records = [json.loads(line) for line in (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in steps] == list(range(1, ITERATIONS + 1))            # rank 0 logs, once
    assert all(r["samples"] == 8 and r["processes"] == 2 and r["optimizer_steps"] == 2 for r in steps)
    one = [json.loads(line) for line in (one_process_run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip([r for r in one if "loss" in r], steps):                         # same global rewards
        assert a["rewards"]["toy_object_color"]["mean"] == pytest.approx(b["rewards"]["toy_object_color"]["mean"], abs=1e-6)


@pytest.mark.integration
def test_two_processes_select_stop_and_average_as_one_process(tiny_model_dir, tmp_path):
    """`make run`'s training under DDP: select_best (a validation evaluation every iteration), early stopping and the
    weight EMA. Rank 1 used to read the tracker's history, which only rank 0 keeps, and crashed at the first
    evaluation; and only rank 0 would have stopped or restored the best weights. Same selection, same weights."""
    held_out = tmp_path / "held_out.txt"  # 3 prompts over 2 ranks: the second share is padded
    held_out.write_text("a red circle on a black background\na green square on a white background\n"
                        "a blue triangle on a yellow background\n")
    extra = {"select_best": True, "eval_every": 1, "early_stop_patience": 1, "optim.ema_decay": 0.5, "max_iterations": 4,
             "eval_prompts": str(held_out)}
    one = tmp_path / "one"
    train(load_config(overrides={**COMMON, **ONE_PROCESS, **extra, "model.path": str(tiny_model_dir), "output_dir": str(one)}))
    run = launch("ddp", tmp_path / "two", tiny_model_dir, *overrides(extra))
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    finals = [[json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"final"' in line][-1]
              for run_dir in (one, tmp_path / "two")]
    assert finals[0]["selected_iteration"] == finals[1]["selected_iteration"]
    # each rank evaluates its share of the held-out prompts, rank 0 scores them all: the one-process numbers
    evaluations = [[json.loads(line)["held_out"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if '"held_out"' in line] for run_dir in (one, tmp_path / "two")]
    assert len(evaluations[0]) == len(evaluations[1]) > 2
    for a, b in zip(*evaluations):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True) for k in a)
    assert finals[0]["iteration"] == finals[1]["iteration"]  # both stopped (or not) at the same evaluation
    base = load_file(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert_same_weights(final_weights(one), final_weights(tmp_path / "two"), base)
    from mixgrpo.evaluate import config_provenance

    cfg = load_config(tmp_path / "two" / "config.yaml")
    assert config_provenance(cfg, tmp_path / "two" / "metrics.jsonl")["processes"] == 2   # the report says so


FAILING_RANK_WORKER = textwrap.dedent("""
    import torch, torch.distributed as dist
    from mixgrpo import distributed
    from mixgrpo.config import load_config
    with distributed.joined(load_config(overrides={"distributed.engine": "ddp", "distributed.timeout_s": 300})) as world:
        if world.rank == 1:
            raise RuntimeError("rank 1 failed before the collective")
        dist.all_gather([torch.zeros(1), torch.zeros(1)], torch.zeros(1))  # rank 0 waits for a rank that never comes
""")


@pytest.mark.integration
def test_a_rank_that_raises_ends_the_job_at_once(tmp_path):
    """A rank that fails leaves without the teardown barrier the others never reach: the job ends with its error,
    not after the collective timeout (300 s here; `make run` hung this way on a rank-1 error)."""
    (tmp_path / "worker.py").write_text(FAILING_RANK_WORKER)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(tmp_path / "worker.py")], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "rank 1 failed before the collective" in done.stderr
    assert time.monotonic() - started < 120


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_rank_fails_the_job_fast_and_resume_completes_it(tiny_model_dir, one_process_run, tmp_path):
    output = tmp_path / "killed"
    run = launch("fsdp", output, tiny_model_dir)
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint_dirs(output) and run.poll() is None:
        time.sleep(0.05)
    victim = _rank_pid_by_parent(run.pid, rank=1)
    assert victim is not None and run.poll() is None, "no running rank 1 found: " + (run.stderr.read() if run.poll() is not None else "")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    out, err = run.communicate(timeout=120)
    elapsed = time.time() - killed_at
    done = checkpoint_dirs(output)
    assert done and int(done[-1].name.split("-")[1]) < ITERATIONS, "the run finished before it could be killed"
    assert run.returncode != 0
    assert elapsed < 60, f"the surviving rank took {elapsed:.0f} s to give up"
    assert "training failed with exit code" in err and "--resume" in err
    assert "rank: 1" in err or "local_rank: 1" in err, err[-2000:]                   # torchrun names the dead rank

    resumed = launch("fsdp", output, tiny_model_dir, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from" in out
    base = load_file(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert_same_weights(final_weights(one_process_run), final_weights(output), base)


def _rank_pid_by_parent(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's descendants (torchrun's children)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    stack = list(children.get(launcher_pid, []))
    while stack:
        pid = stack.pop()
        try:
            if f"RANK={rank}".encode() in (Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                return pid
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return None


def test_checkpoints_are_mirrored_to_the_store_and_resume_from_it(tiny_model_dir, tmp_path):
    """checkpoint_uri=file://...: every checkpoint and the final weights are published (manifest last);
    --resume with an empty output_dir fetches the newest complete one and ends with the same weights."""
    from mixgrpo.storage import latest_complete, read_manifest

    store = f"file://{tmp_path / 'store'}"
    values = {**COMMON, **ONE_PROCESS, "model.path": str(tiny_model_dir), "checkpoint_uri": store,
              "rewards.held_out": [], "max_iterations": 2}
    train(load_config(overrides={**values, "output_dir": str(tmp_path / "first")}))
    assert latest_complete(store, "checkpoint-").endswith("checkpoint-000002")
    assert read_manifest(f"{store}/final").metadata["iteration"] == 2
    train(load_config(overrides={**values, "output_dir": str(tmp_path / "elsewhere"), "max_iterations": 3}), resume=True)
    metrics = [json.loads(line) for line in (tmp_path / "elsewhere" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in metrics if "loss" in r] == [3]                  # iterations 1-2 came from the store
    train(load_config(overrides={**values, "output_dir": str(tmp_path / "straight"), "max_iterations": 3,
                                 "checkpoint_uri": ""}))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "elsewhere")
    assert all(torch.equal(a[k], b[k]) for k in a)
