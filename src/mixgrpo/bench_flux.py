"""``mixgrpo bench --model flux``: seconds per iteration and peak memory of every mode on a FLUX.1-dev-shaped model.

The model is ``mixgrpo.models.random_flux``: FLUX.1-dev's transformer configuration with random weights
(``--blocks D,S`` of the 19 double + 38 single blocks, ``--resolution PX``), full fine-tuning or
``--lora RANK``, bf16 autocast on a GPU (float32 on a CPU), gradient checkpointing on by default (as
the reference scripts train FLUX), ``--engine fsdp`` under torchrun. Each iteration is the trainer's:
``rollout_phase`` (``mixed_rollout``, shared prefix) -> ``score_phase`` (a cheap stand-in reward: the
reward models' cost is the same in every mode) -> group advantages -> ``update_phase`` (or
``update_phase_batched`` with ``--window-batching``).

Reported (``--json``: the keys of ``mixgrpo bench --json`` plus the FLUX ones, one object on the last line):

- ``window_0`` / ``schedule_average``: per mode NFE old/train, seconds per iteration, ratio to DanceGRPO,
  ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated`` on a GPU, peak RSS sampled every 2 ms on a CPU);
  the schedule average is measured at ``--sweep K`` evenly spaced window positions;
- ``per_block``: forward seconds per row of one double / single block at the rollout batch, and
  forward+backward seconds per row at the micro-batch (with checkpointing if on);
- ``extrapolated_full_model``: per mode, the measured seconds plus the missing blocks' cost,
  ``sum_blocks (missing) * (rows_forward * f + rows_train * fb)``: the 57-block time of one GPU
  holding the whole model (optimiser step and communication not extrapolated);
- ``ratio_first_microbatch`` / ``clip_fraction_first_microbatch`` and ``numerics`` (before/after recomputing
  the old log-probs in training shapes), ``window_batching`` (step loop vs batched training phase).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

FLUX_BENCH_MODES = ("dancegrpo", "mixgrpo", "mixgrpo-flash", "mixgrpo-flash-star")
OLD_LOG_PROBS = ("rollout", "recompute")
PEAK_SAMPLE_SECONDS = 0.002


@dataclass
class FluxBenchOptions:
    """One ``mixgrpo bench --model flux`` run (defaults: CPU-sized iterations, FLUX.1-dev widths)."""

    blocks: tuple[int, int] = (19, 38)
    resolution: int = 720
    heads: int = 24
    head_dim: int = 128
    text_dim: int = 4096
    pooled_dim: int = 768
    text_tokens: int = 512
    lora_rank: int = 0
    gradient_checkpointing: bool = True
    engine: str = "none"
    device: str = ""  # "" = cuda when available
    weights_dtype: str = "auto"  # auto: float32 (full fine-tuning, bf16 autocast on CUDA); bfloat16 base under LoRA on CUDA
    group_size: int = 2
    prompts: int = 1
    train_batch_size: int = 2
    modes: tuple[str, ...] = FLUX_BENCH_MODES
    repeats: int = 1
    warmup: bool | None = None  # None: on CUDA only
    sweep: int = 1
    prefix_check: bool | None = None  # None: on CUDA only
    window_batching: bool = False
    old_log_probs: str = "rollout"
    overrides: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- command line


def add_flux_bench_args(p: argparse.ArgumentParser) -> None:
    """The ``mixgrpo bench`` flags of the FLUX-shaped benchmark (used with ``--model flux``)."""
    d = FluxBenchOptions()
    p.add_argument("--model", choices=["toy", "flux"], default="toy", help="toy: the built-in model; flux: FLUX.1-dev-shaped, random weights")
    g = p.add_argument_group("--model flux")
    g.add_argument("--blocks", default="19,38", help="double,single blocks (FLUX.1-dev: 19,38)")
    g.add_argument("--resolution", type=int, default=d.resolution, help="image side in pixels (720 -> 2025 image tokens)")
    g.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA rank (0 = full fine-tuning)")
    g.add_argument("--engine", choices=["none", "fsdp"], default="none", help="fsdp: shard the blocks (launch with torchrun)")
    g.add_argument("--device", default="", help="cpu / cuda (default: cuda when available)")
    g.add_argument("--weights-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    g.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations instead of recomputing them")
    g.add_argument("--group-size", type=int, default=d.group_size, help="images per prompt (N)")
    g.add_argument("--prompts", type=int, default=d.prompts, help="prompts per iteration")
    g.add_argument("--train-batch-size", type=int, default=d.train_batch_size, help="rows per training micro-batch")
    g.add_argument("--modes", default=",".join(d.modes), help="comma-separated modes (dancegrpo first: the reference)")
    g.add_argument("--repeats", type=int, default=d.repeats, help="timed iterations per mode (the fastest counts)")
    g.add_argument("--sweep", type=int, default=d.sweep, help="window positions measured for the schedule average")
    g.add_argument("--prefix-check", action=argparse.BooleanOptionalAction, default=None, help="shared vs unshared rollout at l=8 (default: on a GPU)")
    g.add_argument("--window-batching", action="store_true", help="timed iterations batch a micro-batch's window steps into one forward/backward")
    g.add_argument("--old-logprobs", choices=OLD_LOG_PROBS, default=d.old_log_probs,
                   help="recompute: old log-probs recomputed in training shapes before the update (the bf16 fix)")
    g.add_argument("--heads", type=int, default=d.heads, help="attention heads (tests: fewer)")
    g.add_argument("--head-dim", type=int, default=d.head_dim)
    g.add_argument("--text-dim", type=int, default=d.text_dim, help="T5 width = joint_attention_dim")
    g.add_argument("--pooled-dim", type=int, default=d.pooled_dim)
    g.add_argument("--text-tokens", type=int, default=d.text_tokens, help="T5 tokens per prompt")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override (repeatable)")


def options_from_args(args: argparse.Namespace) -> FluxBenchOptions:
    from mixgrpo.config import parse_override

    try:
        double, single = (int(x) for x in args.blocks.split(","))
    except ValueError:
        raise ValueError(f"--blocks {args.blocks!r}: give double,single block counts, e.g. --blocks 1,2") from None
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or modes[0] != "dancegrpo":
        raise ValueError(f"--modes {args.modes!r} must start with dancegrpo (the ratios' reference)")
    return FluxBenchOptions(
        blocks=(double, single), resolution=args.resolution, heads=args.heads, head_dim=args.head_dim,
        text_dim=args.text_dim, pooled_dim=args.pooled_dim, text_tokens=args.text_tokens, lora_rank=args.lora,
        gradient_checkpointing=not args.no_gradient_checkpointing, engine=args.engine, device=args.device,
        weights_dtype=args.weights_dtype, group_size=args.group_size, prompts=args.prompts,
        train_batch_size=args.train_batch_size, modes=modes, repeats=args.repeats, sweep=args.sweep,
        prefix_check=args.prefix_check, window_batching=args.window_batching, old_log_probs=args.old_logprobs,
        overrides=dict(parse_override(item) for item in args.set))


def main(args: argparse.Namespace) -> int:
    results = run_flux_bench(options_from_args(args))
    if results is None:  # not rank 0
        return 0
    from mixgrpo.bench import report_results

    return report_results(results, format_flux_table(results), Path(args.out) / "flux_speed.json", args.json)


# --------------------------------------------------------------------------- measurement helpers


class PeakMemory:
    """Peak bytes while active: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak RSS
    sampled every 2 ms from /proc/self/statm (falling back to ``ru_maxrss``, the peak since start)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self._stop = None

    @staticmethod
    def rss_bytes() -> int:
        import os

        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakMemory:
        import threading

        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.peak = self.rss_bytes()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(PEAK_SAMPLE_SECONDS):
                self.peak = max(self.peak, self.rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_bytes())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_dtype(cfg, device) -> str:
    """"bf16 autocast" where the trainer's ``autocast_context`` autocasts, else "float32"."""
    import torch

    from mixgrpo.train import autocast_context

    return "bf16 autocast" if isinstance(autocast_context(cfg, device), torch.autocast) else "float32"


def best_seconds(fn, device, repeats: int, warmup: bool) -> float:
    """min over ``repeats`` timed calls of ``fn`` (after one untimed call when ``warmup``)."""
    import time

    if warmup:
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def flux_bench_config(mode: str, options: FluxBenchOptions):
    """The training config of ``mode`` at the bench's sizes (plus ``--set`` overrides)."""
    from mixgrpo.config import load_config

    return load_config(overrides={
        "mode": mode, "prompts_per_iteration": options.prompts, "sampling.group_size": options.group_size,
        "optim.train_batch_size": options.train_batch_size, "progress_bar": False, "rewards.held_out": [],
        "model.kind": "flux", "model.height": options.resolution, "model.width": options.resolution,
        "model.lora_rank": options.lora_rank, "model.gradient_checkpointing": options.gradient_checkpointing,
        "model.max_sequence_length": options.text_tokens, "distributed.engine": options.engine, **options.overrides})


class ImageMeanReward:
    """Stand-in reward (the reward models cost the same in every mode): mean pixel value of each image."""

    name = "bench_image_mean"

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


def train_row_evals(cfg, shard, iteration: int, window: range) -> int:
    """Rows through forward+backward in an update: sum over micro-batches of rows x trained steps."""
    from mixgrpo.train import micro_batches, trained_steps

    return sum(len(rows) * len(trained_steps(cfg, window, generator, len(rows))[0]) for rows, generator in micro_batches(cfg, shard, iteration))


@dataclass
class FluxIteration:
    seconds: float
    rollout_seconds: float
    update_seconds: float
    model_seconds: float
    nfe_old: int
    nfe_train: int
    row_evals_old: int
    row_evals_train: int
    row_evals_recompute: int
    trainer_ratio_first_step: float  # update_phase's own ratio on the first micro-batch's first step


def time_flux_iteration(policy, optimizer, cfg, options: FluxBenchOptions, world, shard, window: range,
                        iteration: int, probe=None) -> FluxIteration:
    """One trainer iteration at a forced window position: rollout -> score -> advantages -> [recompute] -> update.

    ``probe(batch, advantages, iteration)`` runs just before the update (old weights); its time is not counted.
    """
    import time

    from mixgrpo.grpo import group_advantages_with_stats
    from mixgrpo.sampling import flow_sigmas
    from mixgrpo.train import SectionTimer, load_prompts, prompt_for_group, rollout_phase, score_phase, update_phase
    from mixgrpo.update_variants import recompute_old_log_probs, update_phase_batched

    dev = world.device
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift).to(dev)
    train_prompts = load_prompts("", "train")
    prompts = [prompt_for_group(train_prompts, cfg.seed, iteration, g) for g in shard.groups]
    timer = SectionTimer(dev)
    _sync(dev)
    start = time.perf_counter()
    batch = rollout_phase(policy, prompts, cfg, window, iteration, world.rank, dev, sigmas, timer, shard)
    _sync(dev)
    rollout_done = time.perf_counter()
    scores = score_phase({"bench_image_mean": ImageMeanReward()}, batch.images, batch.prompts)
    advantages, _ = group_advantages_with_stats(scores, batch.group_ids, mix=cfg.rewards.mix, clip=cfg.rewards.advantage_clip)
    probe_seconds = 0.0
    if probe is not None:
        _sync(dev)
        probe_start = time.perf_counter()
        probe(batch, advantages, iteration)
        _sync(dev)
        probe_seconds = time.perf_counter() - probe_start
    recompute_rows = 0
    if options.old_log_probs == "recompute":
        batch = recompute_old_log_probs(policy, batch, cfg, iteration, world.rank, dev, batched=options.window_batching,
                                        timer=timer, shard=shard)
        recompute_rows = train_row_evals(cfg, shard, iteration, batch.rollout.window)
    update_start = time.perf_counter()
    update_fn = update_phase_batched if options.window_batching else update_phase
    update = update_fn(policy, optimizer, batch, advantages, cfg, iteration, world.rank, dev, timer, shard)
    _sync(dev)
    end = time.perf_counter()
    return FluxIteration(end - start - probe_seconds, rollout_done - start, end - update_start, sum(timer.seconds.values()),
                         batch.rollout.nfe, update.nfe_train, batch.rollout.row_evals,
                         train_row_evals(cfg, shard, iteration, batch.rollout.window), recompute_rows,
                         update.ratio_first_microbatch)


class ProbeNumerics:
    """Inside mixgrpo's last timed iteration, before its update: the first micro-batch's ratio and clip
    fraction against the rollout's old log-probs and against old log-probs recomputed in training shapes.
    After the iteration, ``report`` times the other training-phase variant (step loop / batched) on the
    same batch, against the iteration's own update time."""

    def __init__(self, policy, cfg, options: FluxBenchOptions, world, shard):
        self.policy, self.cfg, self.options, self.world, self.shard = policy, cfg, options, world, shard
        self.numerics: dict = {}

    def __call__(self, batch, advantages, iteration: int) -> None:
        from mixgrpo.update_variants import first_microbatch_numerics, recompute_old_log_probs

        self.iteration = iteration
        args = (self.policy, batch, self.cfg, iteration, self.world.rank, self.world.device)
        kwargs = {"batched": self.options.window_batching, "shard": self.shard}
        recomputed = recompute_old_log_probs(*args, **kwargs)
        self.batch = batch if self.options.old_log_probs == "rollout" else recomputed
        self.advantages = advantages
        self.numerics["rollout"] = first_microbatch_numerics(*args, **kwargs)
        self.numerics["recompute"] = first_microbatch_numerics(self.policy, recomputed, *args[2:], **kwargs)

    def report(self, optimizer, iteration: FluxIteration) -> dict:
        from mixgrpo.train import SectionTimer, update_phase
        from mixgrpo.update_variants import update_phase_batched

        dev, batched = self.world.device, self.options.window_batching
        other = update_phase if batched else update_phase_batched
        stats = {}

        def run() -> None:
            stats["other"] = other(self.policy, optimizer, self.batch, self.advantages, self.cfg, self.iteration, self.world.rank,
                                   dev, SectionTimer(dev), self.shard)

        other_seconds = best_seconds(run, dev, 1, False)
        step_loop_s, batched_s = (other_seconds, iteration.update_seconds) if batched else (iteration.update_seconds, other_seconds)
        selected = self.numerics[self.options.old_log_probs]
        return {"numerics": {**self.numerics, "dtype": compute_dtype(self.cfg, dev),
                             "old_log_probs": self.options.old_log_probs,
                             "trainer_ratio_first_step": iteration.trainer_ratio_first_step},
                "ratio_first_microbatch": selected["ratio_mean"],
                "clip_fraction_first_microbatch": selected["clip_fraction"],
                "window_batching": {"mode": "mixgrpo", "step_loop_seconds": step_loop_s, "batched_seconds": batched_s,
                                    "speedup": step_loop_s / batched_s, "nfe_train": iteration.nfe_train}}


# --------------------------------------------------------------------------- per-block cost


def _block_inputs(policy, cfg, device, rows: int) -> dict:
    """(args, kwargs) of the first double and first single block during a forward of ``rows`` rows."""
    import torch

    from mixgrpo.train import autocast_context

    module = policy.module
    blocks = {"double": module.transformer_blocks, "single": module.single_transformer_blocks}
    captured: dict = {}
    handles = []
    for name, stack in blocks.items():
        if len(stack):
            def hook(_module, args, kwargs, name=name, block=stack[0]):
                captured.setdefault(name, (block, args, kwargs))
            handles.append(stack[0].register_forward_pre_hook(hook, with_kwargs=True))
    x = torch.randn((rows, *policy.latent_shape()), device=device)
    cond = policy.encode_prompts([f"block probe {i}" for i in range(rows)])
    try:
        with torch.no_grad(), autocast_context(cfg, device):
            policy.velocity(x, torch.tensor(0.5, device=device), cond)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _forward_backward(block, args, kwargs, rows: int, checkpointing: bool, cfg, device):
    """A closure: the block's forward (checkpointed if on) and backward of the sum of its outputs."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from mixgrpo.train import autocast_context

    def leaf(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 2 and value.shape[0] == rows:
            return value.detach().requires_grad_(True)
        return value

    args = tuple(leaf(a) for a in args)
    kwargs = {k: leaf(v) for k, v in kwargs.items()}

    def run() -> None:
        with autocast_context(cfg, device):
            out = checkpoint(block, *args, use_reentrant=False, **kwargs) if checkpointing else block(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor)).backward()
        for p in block.parameters():
            p.grad = None

    return run


def per_block_costs(policy, cfg, options: FluxBenchOptions, device, rollout_rows: int, train_rows: int) -> dict:
    """Seconds per row of one double and one single block: forward at the rollout batch, forward+backward
    at the training micro-batch (checkpointed as in training)."""
    import torch

    from mixgrpo.train import autocast_context

    warmup = options.warmup if options.warmup is not None else device.type == "cuda"
    forward_inputs = _block_inputs(policy, cfg, device, rollout_rows)
    train_inputs = _block_inputs(policy, cfg, device, train_rows)
    costs = {}
    for name, (block, args, kwargs) in forward_inputs.items():
        def forward(block=block, args=args, kwargs=kwargs) -> None:
            with torch.no_grad(), autocast_context(cfg, device):
                block(*args, **kwargs)

        f = best_seconds(forward, device, options.repeats, warmup)
        t_block, t_args, t_kwargs = train_inputs[name]
        fb = best_seconds(_forward_backward(t_block, t_args, t_kwargs, train_rows, options.gradient_checkpointing, cfg, device),
                          device, options.repeats, warmup)
        costs[name] = {"forward_seconds": f, "forward_rows": rollout_rows, "forward_seconds_per_row": f / rollout_rows,
                       "forward_backward_seconds": fb, "forward_backward_rows": train_rows,
                       "forward_backward_seconds_per_row": fb / train_rows,
                       "parameters": sum(p.numel() for p in block.parameters())}
    return costs


def extrapolate(row: dict, per_block: dict, blocks: tuple[int, int], full: tuple[int, int]) -> dict:
    """Measured seconds + missing blocks x (forward rows x f + train rows x fb [+ recompute rows x f])."""
    extra = 0.0
    for name, have, want in (("double", blocks[0], full[0]), ("single", blocks[1], full[1])):
        if name not in per_block:
            continue
        c = per_block[name]
        per_iteration = ((row["row_evals_old"] + row["row_evals_recompute"]) * c["forward_seconds_per_row"]
                         + row["row_evals_train"] * c["forward_backward_seconds_per_row"])
        extra += (want - have) * per_iteration
    return {"blocks": list(full), "seconds_per_iteration": row["seconds_per_iteration"] + extra}


# --------------------------------------------------------------------------- the run


def run_flux_bench(options: FluxBenchOptions) -> dict | None:
    """Every mode on one FLUX-shaped policy; the results dict on rank 0 (None on other ranks)."""
    import gc

    import torch

    from mixgrpo import distributed
    from mixgrpo.bench import window_positions
    from mixgrpo.models.random_flux import FLUX_DEV_ARCHITECTURE, FluxShape, build_random_flux_policy

    if options.old_log_probs not in OLD_LOG_PROBS:
        raise ValueError(f"old_log_probs={options.old_log_probs!r}: choose one of {', '.join(OLD_LOG_PROBS)}")
    if options.sweep < 1 or options.repeats < 1:
        raise ValueError("--sweep and --repeats must be >= 1")
    shape = FluxShape(double=options.blocks[0], single=options.blocks[1], resolution=options.resolution,
                      heads=options.heads, head_dim=options.head_dim, text_dim=options.text_dim,
                      pooled_dim=options.pooled_dim, text_tokens=options.text_tokens)
    base_cfg = flux_bench_config("mixgrpo", options)
    world = distributed.setup(base_cfg, options.device or None)
    try:
        dev = world.device
        cuda = dev.type == "cuda"
        if options.engine == "fsdp" and world.world_size == 1:
            import sys

            print("mixgrpo bench: --engine fsdp in one process shards nothing; launch several with "
                  "`torchrun --nproc-per-node N -m mixgrpo.cli bench --model flux --engine fsdp ...`", file=sys.stderr)
        warmup = options.warmup if options.warmup is not None else cuda
        if options.weights_dtype == "auto":
            weights_dtype = torch.bfloat16 if cuda and options.lora_rank > 0 else torch.float32
        else:
            weights_dtype = getattr(torch, options.weights_dtype)
        policy = build_random_flux_policy(shape, dev, weights_dtype=weights_dtype, lora_rank=options.lora_rank,
                                          gradient_checkpointing=options.gradient_checkpointing)
        parameters = sum(p.numel() for p in policy.module.parameters())
        trainable = sum(p.numel() for p in policy.trainable_parameters())
        shard = distributed.shard_for(base_cfg, world)
        rollout_rows, micro = shard.rows, min(options.train_batch_size, shard.rows)

        def make_optimizer(params, cfg=base_cfg):
            o = cfg.optim
            return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

        policy.module, optimizer = distributed.prepare(policy.module, world, base_cfg, make_optimizer)
        results: dict = {"window_0": {}, "schedule_average": {}, "peak_memory_bytes": {}, "extrapolated_full_model": {}}
        model_seconds = total_seconds = 0.0
        for mode in options.modes:
            cfg = flux_bench_config(mode, options)
            if optimizer is None:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                optimizer = make_optimizer([p for p in policy.module.parameters() if p.requires_grad], cfg)
            positions = window_positions(cfg)
            probe = ProbeNumerics(policy, cfg, options, world, shard) if mode == "mixgrpo" else None
            with PeakMemory(dev) as memory:
                if warmup:
                    time_flux_iteration(policy, optimizer, cfg, options, world, shard, positions[0][0], 0)
                first = [time_flux_iteration(policy, optimizer, cfg, options, world, shard, positions[0][0], r,
                                             probe if r == options.repeats - 1 else None)
                         for r in range(options.repeats)]
            if probe is not None:
                results.update(probe.report(optimizer, first[-1]))
            best = min(first, key=lambda t: t.seconds)
            picks = [positions[round(j * (len(positions) - 1) / (options.sweep - 1))] for j in range(options.sweep)] \
                if options.sweep > 1 and len(positions) > 1 else []
            sweep = [(time_flux_iteration(policy, optimizer, cfg, options, world, shard, w, 0), weight)
                     for w, weight in dict(picks).items()] or [(best, 1)]
            total_weight = sum(weight for _, weight in sweep)
            row = {"nfe_old": best.nfe_old, "nfe_train": best.nfe_train, "seconds_per_iteration": best.seconds,
                   "rollout_seconds": best.rollout_seconds, "update_seconds": best.update_seconds,
                   "row_evals_old": best.row_evals_old, "row_evals_train": best.row_evals_train,
                   "row_evals_recompute": best.row_evals_recompute, "peak_memory_bytes": memory.peak}
            results["window_0"][mode] = row
            results["schedule_average"][mode] = {
                "nfe_old": sum(t.nfe_old * w for t, w in sweep) / total_weight,
                "nfe_train": sum(t.nfe_train * w for t, w in sweep) / total_weight,
                "seconds_per_iteration": sum(t.seconds * w for t, w in sweep) / total_weight,
                "window_positions": len(sweep), "schedule_positions": len(positions)}
            results["peak_memory_bytes"][mode] = memory.peak
            for t in first + [t for t, _ in sweep if t is not best]:
                model_seconds += t.model_seconds
                total_seconds += t.seconds
            optimizer = None  # freed before the next mode's
        for table in ("window_0", "schedule_average"):
            reference = results[table]["dancegrpo"]["seconds_per_iteration"]
            for row in results[table].values():
                row["ratio_to_dancegrpo"] = row["seconds_per_iteration"] / reference
        results["overhead_fraction"] = 1.0 - model_seconds / total_seconds

        if "numerics" not in results:
            raise ValueError("--modes must include mixgrpo (the numerics and window-batching checks run on it)")
        cfg = flux_bench_config("mixgrpo", options)
        results["prefix_check"] = flux_prefix_check(policy, options, world, shard) \
            if (options.prefix_check if options.prefix_check is not None else cuda) else None
        results["per_block"] = per_block_costs(policy, cfg, options, dev, rollout_rows, micro)
        results["model"] = model_costs(policy, cfg, options, dev, rollout_rows, micro, parameters, trainable)
        full = (FLUX_DEV_ARCHITECTURE["num_layers"], FLUX_DEV_ARCHITECTURE["num_single_layers"])
        for mode, row in results["window_0"].items():
            results["extrapolated_full_model"][mode] = extrapolate(row, results["per_block"], options.blocks, full)
        results["setup"] = {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()},
            "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch_threads": torch.get_num_threads(),
            "world_size": world.world_size, "compute_dtype": compute_dtype(cfg, dev),
            "weights_dtype": str(weights_dtype).replace("torch.", ""), "image_tokens": shape.image_tokens,
            "parameters": parameters, "trainable_parameters": trainable, "num_steps": cfg.sampling.num_steps}
        return results if world.is_main else None
    finally:
        distributed.teardown(world)


def flux_prefix_check(policy, options: FluxBenchOptions, world, shard, left: int = 8) -> dict:
    """MixGRPO's rollout at window l with vs without the shared prefix, against the NFE ratio (l + N(T-l))/(NT)."""
    from mixgrpo.sampling import flow_sigmas
    from mixgrpo.train import load_prompts, prompt_for_group, rollout_phase

    dev = world.device
    shared = flux_bench_config("mixgrpo", options)
    unshared = flux_bench_config("mixgrpo", replace(options, overrides={**options.overrides, "sampling.shared_prefix": False}))
    sigmas = flow_sigmas(shared.sampling.num_steps, shared.sampling.shift).to(dev)
    prompts = [prompt_for_group(load_prompts("", "train"), shared.seed, 0, g) for g in shard.groups]
    window = range(left, left + shared.window.size)
    warmup = options.warmup if options.warmup is not None else dev.type == "cuda"

    def seconds(cfg) -> float:
        return best_seconds(lambda: rollout_phase(policy, prompts, cfg, window, 0, world.rank, dev, sigmas, None, shard),
                            dev, options.repeats, warmup)

    shared_s, unshared_s = seconds(shared), seconds(unshared)
    n, steps = len(shard.members), shared.sampling.num_steps
    nfe_ratio = (left + n * (steps - left)) / (n * steps)
    return {"window_start": left, "shared_seconds": shared_s, "unshared_seconds": unshared_s,
            "time_ratio": shared_s / unshared_s, "nfe_ratio": nfe_ratio,
            "relative_error": abs(shared_s / unshared_s - nfe_ratio) / nfe_ratio}


def model_costs(policy, cfg, options: FluxBenchOptions, device, rows: int, micro: int, parameters: int, trainable: int) -> dict:
    """Whole-model forward ms at the rollout batch and forward+backward ms at the micro-batch."""
    import torch

    from mixgrpo.train import autocast_context

    warmup = options.warmup if options.warmup is not None else device.type == "cuda"
    x = torch.randn((rows, *policy.latent_shape()), device=device)
    cond = policy.encode_prompts([f"model probe {i}" for i in range(rows)])
    sigma = torch.tensor(0.5, device=device)

    def forward() -> None:
        with torch.no_grad(), autocast_context(cfg, device):
            policy.velocity(x, sigma, cond)

    def forward_backward() -> None:
        with autocast_context(cfg, device):
            v = policy.velocity(x[:micro], sigma, {k: v[:micro] for k, v in cond.items()})
        v.float().square().mean().backward()
        for p in policy.module.parameters():
            p.grad = None

    return {"parameters": parameters, "trainable_parameters": trainable,
            f"forward_ms_batch_{rows}": 1000 * best_seconds(forward, device, options.repeats, warmup),
            f"forward_backward_ms_batch_{micro}": 1000 * best_seconds(forward_backward, device, options.repeats, warmup)}


# --------------------------------------------------------------------------- report


def format_flux_table(results: dict) -> str:
    s = results["setup"]
    gib = 1024 ** 3
    lines = [f"FLUX-shaped bench on {s['device']}: blocks {s['blocks'][0]},{s['blocks'][1]}, {s['resolution']} px "
             f"({s['image_tokens']} image + {s['text_tokens']} text tokens), "
             f"{'LoRA rank ' + str(s['lora_rank']) if s['lora_rank'] else 'full fine-tuning'}, {s['compute_dtype']}, "
             f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, {s['parameters'] / 1e6:.1f}M parameters "
             f"({s['trainable_parameters'] / 1e6:.1f}M trained), {s['prompts']} prompt(s) x {s['group_size']} images, "
             f"micro-batch {s['train_batch_size']}, engine {s['engine']} x {s['world_size']}"]
    lines.append(f"\n{'mode':<20}{'NFE old':>8}{'NFE train':>10}{'s/iter':>10}{'vs Dance':>9}{'sched avg':>10}"
                 f"{'vs Dance':>9}{'peak GiB':>10}{'57-block s/iter':>17}")
    for mode, row in results["window_0"].items():
        avg = results["schedule_average"][mode]
        lines.append(f"{mode:<20}{row['nfe_old']:>8}{row['nfe_train']:>10}{row['seconds_per_iteration']:>10.2f}"
                     f"{row['ratio_to_dancegrpo']:>9.3f}{avg['seconds_per_iteration']:>10.2f}{avg['ratio_to_dancegrpo']:>9.3f}"
                     f"{row['peak_memory_bytes'] / gib:>10.2f}{results['extrapolated_full_model'][mode]['seconds_per_iteration']:>17.1f}")
    for name, c in results["per_block"].items():
        lines.append(f"{name} block: forward {1000 * c['forward_seconds_per_row']:.1f} ms/row, "
                     f"forward+backward {1000 * c['forward_backward_seconds_per_row']:.1f} ms/row")
    n = results["numerics"]
    lines.append(f"first micro-batch ({n['dtype']}): ratio {n['rollout']['ratio_mean']:.6f} (max |r-1| "
                 f"{n['rollout']['ratio_max_abs_deviation']:.2e}, clipped {n['rollout']['clip_fraction']:.2f}) with rollout "
                 f"log-probs; {n['recompute']['ratio_mean']:.6f} (max |r-1| {n['recompute']['ratio_max_abs_deviation']:.2e}, "
                 f"clipped {n['recompute']['clip_fraction']:.2f}) recomputed in training shapes")
    w = results["window_batching"]
    lines.append(f"training phase (mixgrpo): step loop {w['step_loop_seconds']:.2f} s, window steps batched "
                 f"{w['batched_seconds']:.2f} s (x{w['speedup']:.2f})")
    p = results["prefix_check"]
    if p:
        lines.append(f"shared prefix at l={p['window_start']}: rollout time ratio {p['time_ratio']:.3f} vs NFE ratio {p['nfe_ratio']:.3f}")
    lines.append(f"time outside model forward/backward: {100 * results['overhead_fraction']:.1f}% of an iteration")
    return "\n".join(lines)
