"""The MixGRPO training loop: rollout -> score -> advantages -> update, one iteration a page.

Every random choice of iteration ``m`` (prompts, initial noise, SDE noise, the order of the
micro-batches, the DanceGRPO step subsets) is drawn from generators seeded by
``(seed, m, rank)``, and the sliding window is a pure function of ``m``. A checkpoint therefore
only needs the weights, the optimiser state and ``m``: a run resumed from iteration ``k`` ends
with the same weights as an uninterrupted run, bit for bit.

Launch: ``mixgrpo train --config configs/toy.yaml [section.key=value ...]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from mixgrpo.config import TrainConfig, config_to_dict, config_to_yaml
from mixgrpo.grpo import group_advantages_with_stats, policy_loss
from mixgrpo.models.base import Conditioning, FlowModel, index_conditioning, repeat_conditioning
from mixgrpo.rewards.base import Reward, build_reward
from mixgrpo.sampling import Rollout, dance_sde_step, flow_sigmas, mixed_rollout, sde_step
from mixgrpo.window import SlidingWindow

CHECKPOINT_PREFIX = "checkpoint-"


# --------------------------------------------------------------------------- small helpers


class SectionTimer:
    """Accumulates wall seconds per named section (model forward / backward, for the overhead figure)."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = {}
        self.sync = device is not None and device.type == "cuda"

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts: ``sha256("seed/iteration/stream/...")``."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def autocast_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA ("auto" or "bf16"); float32 elsewhere."""
    use_bf16 = cfg.model.mixed_precision == "bf16" or (cfg.model.mixed_precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_window(cfg: TrainConfig) -> SlidingWindow | None:
    """The sliding window of the config; None for strategy "all" (every step is SDE)."""
    w = cfg.window
    if w.strategy == "all":
        return None
    return SlidingWindow(
        num_steps=cfg.sampling.num_steps, size=w.size, shift_interval=w.shift_interval, stride=w.stride,
        strategy=w.strategy, roll_back=w.roll_back, seed=cfg.seed,
        interval_max=w.interval_max, interval_min=w.interval_min,
    )


def sde_window(cfg: TrainConfig, window: SlidingWindow | None, iteration: int) -> range:
    """Steps sampled with the SDE at ``iteration``: the sliding window, or all T steps."""
    return range(0, cfg.sampling.num_steps) if window is None else window.steps(iteration)


def trained_steps(cfg: TrainConfig, rollout_window: range, generator: torch.Generator) -> list[int]:
    """Steps whose log-probs are optimised for one micro-batch.

    Sliding window: all its steps. Strategy "all": a random ``train_fraction`` of the first T-1
    transitions (DanceGRPO: int(24*0.6) = 14), drawn per micro-batch.
    """
    if cfg.window.strategy != "all":
        return list(rollout_window)
    candidates = cfg.sampling.num_steps - 1
    count = max(1, int(candidates * cfg.window.train_fraction))
    return sorted(torch.randperm(candidates, generator=generator)[:count].tolist())


def step_rule(cfg: TrainConfig) -> Callable:
    return sde_step if cfg.sampling.sde_type == "flow" else dance_sde_step


# --------------------------------------------------------------------------- the four phases


@dataclass
class RolloutBatch:
    prompts: list[str]            # B = G*N, group-major
    group_ids: torch.Tensor       # [B]
    cond: Conditioning            # B rows
    rollout: Rollout
    images: torch.Tensor          # [B, 3, H, W] in [0, 1]


def choose_prompts(prompts: list[str], count: int, seed: int, iteration: int, rank: int = 0) -> list[str]:
    """``count`` training prompts for this iteration and rank (with replacement across iterations)."""
    generator = generator_for(seed, iteration, rank, "prompts")
    index = torch.randint(len(prompts), (count,), generator=generator)
    return [prompts[i] for i in index.tolist()]


def initial_noise(policy: FlowModel, groups: int, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """[G*N, ...] starting latents; one noise per group when ``init_same_noise``."""
    n = cfg.sampling.group_size
    shape = policy.latent_shape()
    if cfg.sampling.init_same_noise:
        return torch.randn((groups, *shape), generator=generator).repeat_interleave(n, dim=0)
    return torch.randn((groups * n, *shape), generator=generator)


@torch.no_grad()
def rollout_phase(policy: FlowModel, prompts: list[str], cfg: TrainConfig, window: range, iteration: int,
                  rank: int, device: torch.device, sigmas: torch.Tensor, timer: SectionTimer | None = None) -> RolloutBatch:
    """Sample N images per prompt with the mixed ODE/SDE sampler of the old policy."""
    s = cfg.sampling
    timer = timer or SectionTimer()
    group_cond = policy.encode_prompts(prompts)
    cond = repeat_conditioning(group_cond, s.group_size)
    generator = generator_for(cfg.seed, iteration, rank, "noise")
    latents = initial_noise(policy, len(prompts), cfg, generator).to(device)

    def velocity_fn(x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows_cond = cond if rows is None else index_conditioning(cond, rows.to(device))
        with timer.section("forward"), autocast_context(cfg, device):
            return policy.velocity(x, sigma, rows_cond).float()

    rollout = mixed_rollout(
        velocity_fn, latents, sigmas, window, s.eta, sde_type=s.sde_type, post_solver=s.post_solver,
        solver_order=s.solver_order, solver_type=s.solver_type, post_ratio=s.post_ratio, shift=s.shift,
        group_size=s.group_size if s.shared_prefix else None, generator=generator,
    )
    images = policy.decode(rollout.sample)
    group_ids = torch.arange(len(prompts)).repeat_interleave(s.group_size)
    return RolloutBatch([p for p in prompts for _ in range(s.group_size)], group_ids, cond, rollout, images)


@torch.no_grad()
def score_phase(rewards: dict[str, Reward], images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Every reward on every image; a failed sample is NaN (masked by the advantage step)."""
    return {name: reward(images, prompts).float().cpu() for name, reward in rewards.items()}


@dataclass
class UpdateStats:
    loss: float = 0.0
    ratio_mean: float = 0.0
    ratio_first_microbatch: float = 1.0
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    grad_norm: float = 0.0
    optimizer_steps: int = 0
    nfe_train: int = 0
    ratios: list[float] = field(default_factory=list)


def update_phase(policy: FlowModel, optimizer: torch.optim.Optimizer, batch: RolloutBatch, advantages: torch.Tensor,
                 cfg: TrainConfig, iteration: int, rank: int, device: torch.device,
                 timer: SectionTimer | None = None) -> UpdateStats:
    """Clipped-ratio policy gradient on the window's log-probs, micro-batch by micro-batch.

    Loss per micro-batch and step: ``mean(max(-A*r, -A*clip(r, 1-eps, 1+eps)))``, divided by
    (steps x accumulation) so an optimiser step averages over both.
    """
    o, s = cfg.optim, cfg.sampling
    timer = timer or SectionTimer()
    ro = batch.rollout
    window = ro.window
    step_fn = step_rule(cfg)
    generator = generator_for(cfg.seed, iteration, rank, "update")
    order = torch.randperm(len(batch.prompts), generator=generator)
    micro_batches = list(order.split(o.train_batch_size))
    parameters = [p for p in policy.trainable_parameters()]
    stats = UpdateStats()
    clip_sum = kl_sum = loss_sum = 0.0
    terms = 0
    for start in range(0, len(micro_batches), o.gradient_accumulation_steps):
        group = micro_batches[start:start + o.gradient_accumulation_steps]
        steps_per_mb = [trained_steps(cfg, window, generator) for _ in group]
        for rows, steps in zip(group, steps_per_mb):
            cond = index_conditioning(batch.cond, rows.to(device))
            adv = advantages[rows].to(device)
            for i in steps:
                k = i - window.start
                x = ro.latents[rows, k].to(device)
                x_next = ro.latents[rows, k + 1].to(device)
                with timer.section("forward_train"), autocast_context(cfg, device):
                    v = policy.velocity(x, ro.sigmas[i], cond).float()
                logp = step_fn(x, v, ro.sigmas, i, s.eta, prev_sample=x_next).log_prob
                out = policy_loss(logp, ro.log_probs[rows, k].to(device), adv, clip_range=o.clip_range, kl_coeff=o.kl_coeff)
                with timer.section("backward"):
                    (out.loss / (len(steps) * len(group))).backward()
                stats.nfe_train += 1
                stats.ratios.append(out.ratio_mean)
                clip_sum += out.clip_fraction
                kl_sum += out.approx_kl
                loss_sum += float(out.loss.detach())
                terms += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, o.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats.grad_norm = max(stats.grad_norm, float(grad_norm))
        stats.optimizer_steps += 1
    stats.loss = loss_sum / max(terms, 1)
    stats.clip_fraction = clip_sum / max(terms, 1)
    stats.approx_kl = kl_sum / max(terms, 1)
    stats.ratio_mean = sum(stats.ratios) / max(len(stats.ratios), 1)
    stats.ratio_first_microbatch = stats.ratios[0] if stats.ratios else 1.0
    return stats


# --------------------------------------------------------------------------- evaluation on held-out prompts


@torch.no_grad()
def sample_images(policy: FlowModel, prompts: list[str], seeds: list[int], cfg: TrainConfig, device: torch.device,
                  batch_size: int = 64) -> torch.Tensor:
    """Deterministic ODE samples (no window), one image per (prompt, seed) pair, in [0, 1]."""
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift).to(device)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
        cond = policy.encode_prompts(chunk)
        latents = torch.stack([torch.randn(policy.latent_shape(), generator=generator_for("sample", seed)) for seed in chunk_seeds]).to(device)

        def velocity_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with autocast_context(cfg, device):
                return policy.velocity(x, sigma, cond).float()

        result = mixed_rollout(velocity_fn, latents, sigmas, range(0, 0), cfg.sampling.eta)
        images.append(policy.decode(result.sample).float().cpu())
    return torch.cat(images)


def held_out_rewards(policy: FlowModel, rewards: dict[str, Reward], prompts: list[str], cfg: TrainConfig,
                     device: torch.device) -> dict[str, float]:
    """Mean of every reward (optimised and held-out) over held-out prompts x fixed seeds."""
    per_prompt = cfg.eval_images_per_prompt
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [derive_seed("eval", i) for i in range(len(all_prompts))]
    images = sample_images(policy, all_prompts, seeds, cfg, device)
    scores = score_phase(rewards, images, all_prompts)
    return {name: float(torch.nanmean(value)) for name, value in scores.items()}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with their manifest), oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "MANIFEST.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(output_dir: Path, iteration: int, policy: FlowModel, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig) -> Path:
    """Write ``checkpoints/checkpoint-{iteration}`` atomically: files, manifest last, then rename.

    ``iteration`` is the number of completed iterations (the next one to run).
    """
    root = output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{iteration:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in policy.module.state_dict().items()}, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "config.yaml").write_text(config_to_yaml(cfg))
    (tmp / "trainer_state.json").write_text(json.dumps({"iteration": iteration}))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())}
    (tmp / "MANIFEST.json").write_text(json.dumps({"iteration": iteration, "sha256": files}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(output_dir)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, policy: FlowModel, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimiser and RNG; return the next iteration to run."""
    manifest = json.loads((path / "MANIFEST.json").read_text())
    for name, digest in manifest["sha256"].items():
        if hashlib.sha256((path / name).read_bytes()).hexdigest() != digest:
            raise RuntimeError(f"checkpoint {path}: {name} does not match its sha256 in MANIFEST.json; "
                               "the checkpoint is corrupt, delete it to resume from the previous one")
    state = load_file(path / "model.safetensors")
    policy.module.load_state_dict(state)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=False)["torch"])
    return int(manifest["iteration"])


# --------------------------------------------------------------------------- set-up


def build_policy(cfg: TrainConfig, device: torch.device) -> FlowModel:
    """The policy adapter named by ``cfg.model`` (toy: the cached built-in base)."""
    if cfg.model.kind == "toy":
        from mixgrpo.toy.model import load_toy_model
        from mixgrpo.toy.pretrain import ensure_base_model

        path = cfg.model.path or str(ensure_base_model())
        policy = load_toy_model(path)
    else:
        raise NotImplementedError(f"model.kind={cfg.model.kind!r} is not available yet; use model.kind=toy")
    policy.module.to(device)
    if cfg.model.gradient_checkpointing and hasattr(policy.module, "enable_gradient_checkpointing"):
        policy.module.enable_gradient_checkpointing()
    return policy


def build_rewards(cfg: TrainConfig, names: list[str], device: torch.device) -> dict[str, Reward]:
    return {name: build_reward(name, **cfg.rewards.options.get(name, {})) for name in names}


def load_prompts(path: str, split: str) -> list[str]:
    """Prompts from a text file (one per line), or the toy world's ``split`` ("train" / "test")."""
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"prompt file {file} does not exist")
        prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {file} has no non-empty lines")
        return prompts
    from mixgrpo.toy.world import train_test_split

    train, test = train_test_split()
    return list(train if split == "train" else test)


# --------------------------------------------------------------------------- the loop


class MetricsLog:
    """Append-only JSON-lines metrics file, mirrored to MLflow when a tracking URI is set."""

    def __init__(self, path: Path, cfg: TrainConfig):
        self.path = path
        self.mlflow = None
        if cfg.mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
            mlflow.set_experiment(cfg.mlflow_experiment)
            self.run = mlflow.start_run(run_name=Path(cfg.output_dir).name)
            mlflow.log_params({k: str(v)[:250] for k, v in _flat(config_to_dict(cfg)).items()})
            self.mlflow = mlflow

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.mlflow is not None:
            numbers = {k: float(v) for k, v in _flat(record).items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.mlflow.log_metrics(numbers, step=int(record["iteration"]))

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class TrainResult:
    output_dir: Path
    iterations: int
    final_weights: Path
    held_out_before: dict[str, float]
    held_out_after: dict[str, float]
    seconds: float


def iterations_bar(start: int, stop: int, enabled: bool) -> Iterator[int]:
    if not enabled:
        return iter(range(start, stop))
    from tqdm.auto import tqdm

    return iter(tqdm(range(start, stop), initial=start, total=stop, desc="mixgrpo", unit="it", dynamic_ncols=True))


def train(cfg: TrainConfig, *, resume: bool = False, device: str | None = None) -> TrainResult:
    """Run MixGRPO (or a baseline mode) for ``cfg.max_iterations`` iterations."""
    t_start = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(config_to_yaml(cfg))

    policy = build_policy(cfg, dev)
    rewards = build_rewards(cfg, cfg.rewards.names, dev)
    all_rewards = {**rewards, **build_rewards(cfg, [n for n in cfg.rewards.held_out if n not in rewards], dev)}
    train_prompts = load_prompts(cfg.prompts, "train")
    eval_prompts = load_prompts(cfg.eval_prompts, "test")
    optimizer = torch.optim.AdamW(list(policy.trainable_parameters()), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    window = build_window(cfg)
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift).to(dev)

    start_iteration = 0
    if resume and checkpoint_dirs(output_dir):
        start_iteration = load_checkpoint(checkpoint_dirs(output_dir)[-1], policy, optimizer)
        print(f"resumed from {checkpoint_dirs(output_dir)[-1]} at iteration {start_iteration}")
    elif not resume:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    log = MetricsLog(output_dir / "metrics.jsonl", cfg)

    held_out_before = held_out_rewards(policy, all_rewards, eval_prompts, cfg, dev)
    if start_iteration == 0:
        log.log({"iteration": 0, "held_out": held_out_before})

    for iteration in iterations_bar(start_iteration, cfg.max_iterations, cfg.progress_bar):
        timer = SectionTimer(dev)
        t0 = time.perf_counter()
        steps = sde_window(cfg, window, iteration)
        prompts = choose_prompts(train_prompts, cfg.prompts_per_iteration, cfg.seed, iteration)
        batch = rollout_phase(policy, prompts, cfg, steps, iteration, 0, dev, sigmas, timer)
        t1 = time.perf_counter()
        scores = score_phase(all_rewards, batch.images, batch.prompts)
        optimised = {name: scores[name] for name in rewards}
        advantages, adv_stats = group_advantages_with_stats(
            optimised, batch.group_ids, weights=cfg.rewards.weights or None, mix=cfg.rewards.mix,
            clip=cfg.rewards.advantage_clip, on_failure=cfg.rewards.on_failure)
        t2 = time.perf_counter()
        update = update_phase(policy, optimizer, batch, advantages, cfg, iteration, 0, dev, timer)
        t3 = time.perf_counter()

        record = {
            "iteration": iteration + 1,
            "window_start": steps.start, "window_stop": steps.stop,
            "nfe_old": batch.rollout.nfe, "row_evals_old": batch.rollout.row_evals, "nfe_train": update.nfe_train,
            "rewards": {name: {"mean": float(torch.nanmean(v)), "std": float(torch.nan_to_num(v).std())} for name, v in scores.items()},
            "advantage": {"mean": float(advantages.mean()), "std": float(advantages.std()), "abs_max": float(advantages.abs().max()),
                          "failed": adv_stats.num_failed, "invalid": adv_stats.num_invalid, "clipped": adv_stats.num_clipped},
            "loss": update.loss, "ratio_mean": update.ratio_mean, "ratio_first_microbatch": update.ratio_first_microbatch,
            "clip_fraction": update.clip_fraction, "approx_kl": update.approx_kl, "grad_norm": update.grad_norm,
            "optimizer_steps": update.optimizer_steps,
            "seconds": {"rollout": t1 - t0, "reward": t2 - t1, "train": t3 - t2, "total": t3 - t0,
                        **{f"model_{name}": value for name, value in timer.seconds.items()}},
        }
        done = iteration + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_iterations:
            record["held_out"] = held_out_rewards(policy, all_rewards, eval_prompts, cfg, dev)
        log.log(record)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save_checkpoint(output_dir, done, policy, optimizer, cfg)

    final_iteration = max(cfg.max_iterations, start_iteration)
    if not checkpoint_dirs(output_dir) or int(checkpoint_dirs(output_dir)[-1].name[len(CHECKPOINT_PREFIX):]) != final_iteration:
        save_checkpoint(output_dir, final_iteration, policy, optimizer, cfg)
    held_out_after = held_out_rewards(policy, all_rewards, eval_prompts, cfg, dev)
    log.log({"iteration": final_iteration, "held_out": held_out_after, "final": True})
    log.close()
    final_dir = output_dir / "final"
    shutil.rmtree(final_dir, ignore_errors=True)
    policy.module.save_pretrained(final_dir / "transformer", safe_serialization=True)
    return TrainResult(output_dir, final_iteration, final_dir, held_out_before, held_out_after, time.perf_counter() - t_start)
