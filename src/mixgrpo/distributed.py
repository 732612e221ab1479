"""Several processes for one run: process group, engines (DDP / FSDP / DeepSpeed), the global batch, launch.

Every rank rolls out its own shard of the global batch (:class:`Shard`); samples are named by a
global group id, so prompts and noise do not depend on how many processes share the work. Rewards
are gathered over all ranks and each group is normalised over all its samples
(:func:`gather_group_advantages`), even when the group is spread over ranks.

Launch (one node, or a Kubeflow Trainer pod that sets ``PET_NNODES``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NPROC_PER_NODE``)::

    mixgrpo launch --engine fsdp -- train --config toy

Backend: NCCL on CUDA, gloo on CPU. One process (no ``WORLD_SIZE``) needs no process group and
wraps nothing, whatever the engine.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from mixgrpo.config import PRESET_DIR, ConfigError, TrainConfig
from mixgrpo.grpo import AdvantageStats, group_advantages_with_stats

ENGINES = ("none", "ddp", "fsdp", "deepspeed")
FSDP_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
DEEPSPEED_MARK = "deepspeed_weights_only"


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    engine: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(cfg: TrainConfig, device: str | None = None) -> World:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ...) with a timeout."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dev = torch.device("cuda", local_rank) if cuda else torch.device(device or "cpu")
    if world_size == 1:
        return World(device=dev, engine=cfg.distributed.engine)
    if cfg.distributed.engine == "none":
        raise ConfigError(f"{world_size} processes were launched but distributed.engine=none; "
                          "set distributed.engine=ddp, fsdp or deepspeed (or launch one process)")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    return World(rank, world_size, local_rank, dev, cfg.distributed.engine)


def teardown(world: World, failed: bool = False) -> None:
    """Leave together: a barrier first, so no rank destroys the group while another is still in a collective.
    A rank that ``failed`` leaves at once: the others cannot reach the barrier (they wait in the collective it
    never joined), so it must exit, and torchrun then stops them, rather than wait for them until the timeout."""
    if world.distributed and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(cfg: TrainConfig, device: str | None = None) -> Iterator[World]:
    """``setup`` for the ``with`` block, then ``teardown``: together after success, at once after a failure."""
    world = setup(cfg, device)
    try:
        yield world
    except BaseException:
        teardown(world, failed=True)
        raise
    teardown(world)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(world: World, value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- the global batch


@dataclass(frozen=True)
class Shard:
    """The part of the global batch one rank rolls out: some groups, and which of each group's N samples.

    Local rows are group-major: for each of ``groups``, the samples ``members`` (all N unless
    ``split_groups``).
    """

    groups: tuple[int, ...]  # global group ids
    members: range  # indices inside a group, 0..N-1

    @property
    def rows(self) -> int:
        return len(self.groups) * len(self.members)


def shard_for(cfg: TrainConfig, world: World) -> Shard:
    """Groups ``rank*P .. rank*P+P-1`` (P = prompts_per_iteration), or with ``split_groups`` the
    rank's N/W samples of every one of the P groups."""
    n, p, w, r = cfg.sampling.group_size, cfg.prompts_per_iteration, world.world_size, world.rank
    if not cfg.distributed.split_groups or w == 1:
        return Shard(tuple(range(r * p, (r + 1) * p)), range(n))
    if n % w:
        raise ConfigError(f"distributed.split_groups needs sampling.group_size ({n}) divisible by the "
                          f"number of processes ({w}); change group_size or the process count")
    per_rank = n // w
    return Shard(tuple(range(p)), range(r * per_rank, (r + 1) * per_rank))


def _comm_device(world: World) -> torch.device:
    return world.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_rows(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, rank-major (all ranks pass the same shape)."""
    if not world.distributed:
        return tensor
    local = tensor.to(_comm_device(world)).contiguous()
    parts = [torch.empty_like(local) for _ in range(world.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def rank_slice(items: Sequence, world: World) -> list:
    """This rank's equal share of ``items``: ``ceil(len / W)`` consecutive items, rank-major, the last item
    repeated to fill the last shares, so every rank does the same work (sharded engines need the same calls)."""
    if not world.distributed or not items:
        return list(items)
    per_rank = -(-len(items) // world.world_size)
    padded = list(items) + [items[-1]] * (per_rank * world.world_size - len(items))
    return padded[world.rank * per_rank:(world.rank + 1) * per_rank]


def gather_rows_to_main(world: World, tensor: torch.Tensor) -> torch.Tensor | None:
    """Every rank's ``tensor`` (the same shape on all ranks) concatenated along dim 0, rank-major, on rank 0;
    ``None`` on the other ranks."""
    if not world.distributed:
        return tensor
    local = tensor.to(_comm_device(world)).contiguous()
    parts = [torch.empty_like(local) for _ in range(world.world_size)] if world.is_main else None
    dist.gather(local, parts, dst=0)
    return torch.cat(parts).to(tensor.device) if world.is_main else None


def gather_group_advantages(world: World, rewards: dict[str, torch.Tensor], group_ids: torch.Tensor,
                            optimised: Sequence[str] | None = None, **options
                            ) -> tuple[torch.Tensor, AdvantageStats, dict[str, torch.Tensor]]:
    """Advantages of this rank's samples, each group normalised over all its samples on all ranks.

    ``group_ids`` must be global (the same id on every rank that holds part of the group). Returns
    the local advantages, the statistics and the gathered rewards (all of ``rewards``) of the whole
    global batch. Only the ``optimised`` rewards (default: all) enter the advantages; ``options`` go
    to :func:`mixgrpo.grpo.group_advantages_with_stats` (weights, mix, clip, on_failure).
    """
    names = sorted(rewards)
    local = torch.stack([rewards[name].float().cpu() for name in names] + [group_ids.double().cpu()], dim=1)
    rows = local.shape[0]
    sizes = all_gather_rows(world, torch.tensor([rows]))
    if bool((sizes != rows).any()):
        raise RuntimeError(f"ranks hold different numbers of samples ({sizes.tolist()}); every rank must roll out "
                           "the same number of samples (same prompts_per_iteration and group_size)")
    gathered = all_gather_rows(world, local.double())
    all_rewards = {name: gathered[:, i].float() for i, name in enumerate(names)}
    all_groups = gathered[:, -1].long()
    chosen = {n: all_rewards[n] for n in (optimised if optimised is not None else rewards)}
    advantages, stats = group_advantages_with_stats(chosen, all_groups, **options)
    return advantages[world.rank * rows:(world.rank + 1) * rows], stats, all_rewards


@torch.no_grad()
def score_on_rank0(world: World, rewards: dict, names: list[str], images: torch.Tensor, prompts: list[str]
                   ) -> dict[str, torch.Tensor]:
    """Gather every rank's images to rank 0, score them there, scatter each rank its scores."""
    comm = _comm_device(world)
    everything = gather_rows_to_main(world, images.detach().float())
    all_prompts: list = [None] * world.world_size if world.is_main else None
    dist.gather_object(prompts, all_prompts, dst=0)
    chunks = None
    if world.is_main:
        flat = [p for part in all_prompts for p in part]
        scores = torch.stack([rewards[name](everything, flat).float().to(comm) for name in names], dim=1)
        chunks = list(scores.chunk(world.world_size))
    mine = torch.empty(len(prompts), len(names), device=comm)
    dist.scatter(mine, chunks, src=0)
    return {name: mine[:, i].cpu() for i, name in enumerate(names)}


# --------------------------------------------------------------------------- engines


def wrap_module(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """The module forward/backward go through: DDP wrapper, or the FSDP2-sharded module itself."""
    if not world.distributed:
        return module
    if world.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if world.engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = [m for m in module.modules() if type(m).__name__ in FSDP_BLOCKS]
        if not blocks:
            raise ConfigError(f"distributed.engine=fsdp found no {' / '.join(FSDP_BLOCKS)} in {type(module).__name__}; "
                              "use engine=ddp for other models")
        for block in blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    raise ConfigError(f"distributed.engine={world.engine} wraps the model together with its optimiser; use prepare()")


def prepare(module: torch.nn.Module, world: World, cfg: TrainConfig,
            make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
            ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(module for forward/backward, optimiser) for the engine; the optimiser sees the wrapped parameters."""
    if world.engine != "deepspeed" or not world.distributed:
        wrapped = wrap_module(module, world)
        return wrapped, make_optimizer([p for p in wrapped.parameters() if p.requires_grad])
    if world.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # reuses the process group
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module, optimizer=make_optimizer([p for p in module.parameters() if p.requires_grad]),
        config=deepspeed_config(cfg))
    return engine, optimizer


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON with the trainer's values filled in: the loop owns the accumulation boundary
    (``managed_gradient_accumulation: false``, one ``step()`` per optimiser step) and the clipping norm."""
    import json

    d = cfg.distributed
    path = Path(d.deepspeed_config) if d.deepspeed_config else PRESET_DIR / "deepspeed" / f"zero{d.zero_stage}.json"
    if not path.is_file():
        raise ConfigError(f"distributed.deepspeed_config: {path} does not exist; give a DeepSpeed JSON file or '' for the shipped one")
    values = json.loads(path.read_text())
    values.update(train_micro_batch_size_per_gpu=cfg.optim.train_batch_size,
                  gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
                  gradient_clipping=cfg.optim.max_grad_norm, managed_gradient_accumulation=False)
    values["bf16"] = {"enabled": False}  # weights and optimiser in float32; the trainer autocasts the forward
    zero = values.setdefault("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]  # DeepSpeed's own defaults
    if not d.deepspeed_config:
        zero["stage"] = d.zero_stage
    return values


def is_deepspeed(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "DeepSpeedEngine"


def backward(module: torch.nn.Module, loss: torch.Tensor) -> None:
    """``loss.backward()``; DeepSpeed accumulates through its engine (the loss is already scaled)."""
    if is_deepspeed(module):
        module.backward(loss, scale_wrt_gas=False)
    else:
        loss.backward()


def optimizer_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip the gradient norm, step, zero the gradients; returns the norm before clipping."""
    if is_deepspeed(module):
        module.step()  # clips with gradient_clipping and zeroes the gradients itself
        return float(module.get_global_grad_norm() or 0.0)
    norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_norm(norm)


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last of an accumulation step."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
    yield


def full_states(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimiser state dicts on CPU, on rank 0 (empty elsewhere); collective.

    Keys are parameter names (as in the diffusers safetensors), for DDP / FSDP / one process, so a
    checkpoint written with one of them resumes with another. DeepSpeed: the full weights (ZeRO-3
    gathered on rank 0) and no optimiser state (its ZeRO shards are per rank): such a checkpoint
    gives final weights but cannot be resumed.
    """
    if is_deepspeed(module):
        return full_model_state(module), {DEEPSPEED_MARK: True}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_model_state(module), get_optimizer_state_dict(module, optimizer, options=options)


def full_model_state(module: torch.nn.Module) -> dict:
    """The full model state dict on CPU, on rank 0 (empty elsewhere); collective. Weights only: reading the
    optimiser's state before its first step would create it (torch takes a zero-learning-rate step), which counts
    a step and changes Adam's bias correction, so a best-weights snapshot at iteration 0 reads only this."""
    if is_deepspeed(module):
        if module.zero_optimization_partition_weights():
            weights = module._zero3_consolidated_16bit_state_dict()
        else:
            weights = module.module.state_dict()
        main = dist.get_rank() == 0
        return {k: v.detach().float().cpu() for k, v in weights.items()} if main and weights else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_states(world: World, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts held by rank 0 (others pass ``{}``) into every rank's (sharded) module."""
    if is_deepspeed(module) or optimizer_state.get(DEEPSPEED_MARK):
        raise ConfigError("resuming a distributed.engine=deepspeed run is not supported yet: its checkpoints hold "
                          "the weights but not the per-rank ZeRO optimiser state; train with engine=fsdp or ddp to resume")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.distributed)
    set_model_state_dict(module, model_state, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


def load_full_model_state(world: World, module: torch.nn.Module, model_state: dict) -> None:
    """Load a full model state dict held by rank 0 (others pass ``{}``) into every rank's module (weights only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if is_deepspeed(module):
        raise ConfigError("select_best with distributed.engine=deepspeed is not supported; use fsdp or ddp")
    set_model_state_dict(module, model_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.distributed))


def total_norm(norm: torch.Tensor) -> float:
    """The gradient norm ``clip_grad_norm_`` returned (a DTensor under FSDP2)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --------------------------------------------------------------------------- launch


def launch_command(train_args: Sequence[str], *, engine: str | None = None, launcher: str = "torchrun",
                   nproc_per_node: str | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """The torchrun / accelerate command line for this node, from the Kubeflow Trainer's PET_* variables.

    Without ``PET_NNODES`` it is a one-node job (torchrun ``--standalone``). ``engine`` is appended
    to the training overrides as ``distributed.engine=...``.
    """
    env = os.environ if env is None else env
    nnodes = int(env.get("PET_NNODES", "1"))
    nproc = nproc_per_node or env.get("PET_NPROC_PER_NODE") or ("gpu" if torch.cuda.is_available() else "1")
    args = list(train_args)
    if not args or args[0] != "train":
        raise ValueError(f"expected `train ...` after `--`, got {' '.join(args) or 'nothing'}; "
                         "e.g. mixgrpo launch --engine ddp -- train --config toy")
    if engine:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        args.append(f"distributed.engine={engine}")
    multi = "PET_NNODES" in env
    rdzv = {"nnodes": str(nnodes), "node_rank": env.get("PET_NODE_RANK", "0"),
            "master_addr": env.get("PET_MASTER_ADDR", "127.0.0.1"), "master_port": env.get("PET_MASTER_PORT", "29500")}
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        if multi:
            command += [f"--nnodes={rdzv['nnodes']}", f"--node-rank={rdzv['node_rank']}",
                        f"--master-addr={rdzv['master_addr']}", f"--master-port={rdzv['master_port']}"]
        else:
            command += ["--standalone"]
        return command + ["-m", "mixgrpo.cli", *args]
    if launcher == "accelerate":
        if not nproc.isdigit():
            raise ValueError(f"accelerate needs a number of processes per node, got {nproc!r}; set PET_NPROC_PER_NODE or --nproc-per-node")
        config = accelerate_config(engine or "ddp")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                "--num_machines", rdzv["nnodes"], "--machine_rank", rdzv["node_rank"],
                "--main_process_ip", rdzv["master_addr"], "--main_process_port", rdzv["master_port"],
                "--num_processes", str(nnodes * int(nproc)), "-m", "mixgrpo.cli", *args]
    raise ValueError(f"unknown launcher {launcher!r}; choose torchrun or accelerate")


def accelerate_config(engine: str, zero_stage: int = 2) -> Path:
    """The accelerate launch file shipped for ``engine`` (package data: ``mixgrpo/presets/accelerate/``)."""
    name = {"none": "ddp", "ddp": "ddp", "fsdp": "fsdp", "deepspeed": f"zero{zero_stage}"}[engine]
    return PRESET_DIR / "accelerate" / f"{name}.yaml"


def run_launch(train_args: Sequence[str], **options) -> int:
    """Run the launch command; a failed rank ends the job with a clear message and its exit code."""
    import subprocess

    command = launch_command(train_args, **options)
    print("mixgrpo launch:", shlex.join(command), flush=True)
    code = subprocess.call(command)
    if code != 0:
        print(f"mixgrpo launch: training failed with exit code {code}: a rank died, failed or timed out "
              "(the first error above names it). Fix the cause, then rerun the same command with --resume "
              "to continue from the last complete checkpoint.", file=sys.stderr)
    return code
