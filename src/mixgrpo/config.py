"""Typed, strict run configuration.

One ``TrainConfig`` describes a run. It is built in three layers, later wins:

1. the dataclass defaults (the paper's FLUX numbers where they apply),
2. the preset of the chosen ``mode`` (``MODE_PRESETS``),
3. a YAML file, then ``section.key=value`` overrides from the command line.

Unknown keys, wrong types and invalid choices are errors that name the key and the fix; the
resolved config is written next to every checkpoint.

Effective batch per iteration = ``prompts_per_iteration`` x ``sampling.group_size`` trajectories
(per process; multiply by the number of processes for the global batch). One optimiser step sees
``optim.train_batch_size`` x ``optim.gradient_accumulation_steps`` trajectories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Mode = Literal["mixgrpo", "mixgrpo-flash", "mixgrpo-flash-star", "dancegrpo", "flow-grpo"]
MODES: tuple[str, ...] = typing.get_args(Mode)


class ConfigError(ValueError):
    """A config key is missing, unknown, of the wrong type or has an invalid value."""


@dataclass
class ModelConfig:
    kind: Literal["toy", "flux"] = "toy"
    """Which adapter: the built-in toy FLUX-class model, or FLUX.1-dev from ``path``."""
    path: str = ""
    """Local directory or s3:// prefix in diffusers layout; "" = the built-in toy base (pre-trained once, cached)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time)."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """bf16 autocast; "auto" = bf16 on CUDA, float32 on CPU."""
    height: int = 720
    """flux: training image height in pixels, a multiple of 16 (720 -> 90x90 latents, 2025 tokens)."""
    width: int = 720
    """flux: training image width in pixels, a multiple of 16."""
    guidance: float = 3.5
    """flux: the guidance-distilled embedding's input (FLUX.1-dev: 3.5; one forward per step, no CFG)."""
    max_sequence_length: int = 512
    """flux: T5 tokens per prompt (padded / truncated)."""
    lora_rank: int = 0
    """flux: 0 = train the full transformer; > 0 = LoRA (peft) of this rank on lora_target_modules, base frozen."""
    lora_alpha: float | None = None
    """flux: LoRA alpha (scale alpha/rank); None = lora_rank."""
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
    """flux: transformer submodules that get LoRA (default: every attention projection)."""
    transformer_dtype: Literal["float32", "bfloat16"] = "float32"
    """flux: storage dtype of the transformer weights (LoRA weights stay float32)."""
    embedding_cache_dir: str = ""
    """flux: directory of cached prompt embeddings (safetensors shards, see precompute_prompt_embeddings); "" = in memory."""


@dataclass
class SamplingConfig:
    num_steps: int = 25
    """T, denoising steps of the old-policy sampler (spec: 25)."""
    shift: float = 3.0
    """Timestep shift of the flow schedule sigma = shift*s/(1+(shift-1)*s)."""
    eta: float = 0.7
    """SDE noise level inside the window (MixGRPO 0.7; DanceGRPO 0.3)."""
    sde_type: Literal["flow", "dance"] = "flow"
    """Step rule inside the window: Flow-GRPO/MixGRPO SDE or the DanceGRPO SDE."""
    group_size: int = 12
    """N, images per prompt; their rewards are normalised together."""
    init_same_noise: bool = True
    """All N images of a group start from the same initial noise (as the reference)."""
    shared_prefix: bool = True
    """Compute the ODE steps before the window once per group (needs init_same_noise)."""
    post_solver: Literal["euler", "dpmsolver++"] = "euler"
    """ODE solver after the window; dpmsolver++ with post_ratio gives MixGRPO-Flash."""
    solver_order: int = 2
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    post_ratio: float | None = None
    """Fraction of post-window steps kept by the compressed schedule (Flash 0.4, Flash* 0.2)."""


@dataclass
class WindowConfig:
    strategy: Literal["progressive", "random", "frozen", "linear_decay", "exp_decay", "all"] = "progressive"
    """How the window moves; "all" = every step is SDE (DanceGRPO / Flow-GRPO baselines)."""
    size: int = 4
    """w, SDE steps in the window (all trained)."""
    shift_interval: int = 25
    """tau, iterations before the window moves by ``stride``."""
    stride: int = 1
    roll_back: bool = True
    """Reference behaviour: the window restarts at 0 after passing T-2 (the paper clamps instead)."""
    interval_max: int = 10
    interval_min: int = 1
    train_fraction: float = 1.0
    """For strategy "all": fraction of the T-1 transitions trained per micro-batch (DanceGRPO 0.6)."""


@dataclass
class RewardConfig:
    names: list[str] = field(default_factory=lambda: ["toy_object_color", "toy_background", "toy_shape"])
    """Registered reward names (see ``mixgrpo rewards list``)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weight per reward name; empty = equal weights. Normalised to sum to 1."""
    mix: Literal["advantage", "reward"] = "advantage"
    """"advantage": normalise each reward in its group, then weighted mean; "reward": weighted sum, then normalise."""
    advantage_clip: float = 5.0
    on_failure: Literal["mask", "raise"] = "mask"
    """A reward that fails for a sample is masked out of the statistics, or stops the run."""
    held_out: list[str] = field(default_factory=lambda: ["toy_heldout_realism"])
    """Measured every iteration but never optimised (to spot reward hacking)."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments per reward name (e.g. weight directories, endpoints)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    train_batch_size: int = 3
    """Trajectories per forward/backward micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimiser step."""
    clip_range: float = 1e-4
    """PPO clip epsilon on the probability ratio."""
    kl_coeff: float = 0.0
    """Weight of the KL-to-old term 0.5*(logp_new-logp_old)^2."""


@dataclass
class DistributedConfig:
    """Several processes (``mixgrpo launch`` / ``torchrun``): how the model is replicated and the batch is split.

    With W processes the global batch per iteration is W x ``prompts_per_iteration`` groups of N
    (or ``prompts_per_iteration`` groups when ``split_groups``); gradients are averaged over the
    ranks, so one optimiser step sees W x ``optim.train_batch_size`` x ``optim.gradient_accumulation_steps``
    trajectories. A 1-process run with W x the prompts and W x the accumulation steps takes the
    same steps on the same samples (prompts and noise are seeded by global group id).
    """

    engine: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    """"none": one process; "ddp": replicated weights, averaged gradients; "fsdp": FSDP2 full shard
    (each FluxTransformerBlock / FluxSingleTransformerBlock wrapped, weights consolidated on rank 0 to
    save; activation checkpointing with model.gradient_checkpointing); "deepspeed": ZeRO-2/3 engine
    (``pip install -e '.[distributed]'``; launch files in configs/accelerate/zero*.yaml and
    configs/deepspeed/; its checkpoints hold the weights but not the ZeRO optimiser shards, so a
    DeepSpeed run cannot be resumed yet -- use fsdp for resumable sharded runs)."""
    zero_stage: Literal[2, 3] = 2
    """engine=deepspeed: ZeRO stage; picks configs/deepspeed/zero{stage}.json unless deepspeed_config is set."""
    deepspeed_config: str = ""
    """engine=deepspeed: DeepSpeed JSON config; "" = the shipped configs/deepspeed/zero{zero_stage}.json."""
    reward_ranks: Literal["all", "rank0"] = "all"
    """"all": every rank scores its own images; "rank0": images are gathered to rank 0, scored there
    (reward models loaded once) and the scores scattered back."""
    split_groups: bool = False
    """Spread each group's N samples over the ranks (N divisible by W): the global batch is then
    ``prompts_per_iteration`` groups; rewards are still normalised over the whole group."""
    timeout_s: int = 600
    """Seconds a collective waits for the other ranks before it fails (a dead or hung rank ends the job)."""


@dataclass
class TrainConfig:
    mode: Mode = "mixgrpo"
    """Algorithm preset; see MODE_PRESETS. Explicit keys in the file or on the command line win."""
    seed: int = 714
    max_iterations: int = 300
    prompts_per_iteration: int = 1
    """Prompts per iteration per process (the paper: 1 per GPU x 32 GPUs)."""
    prompts: str = ""
    """Training prompts: a text file (one per line), or "" for the toy world's training split."""
    eval_prompts: str = ""
    """Held-out prompts for the periodic evaluation; "" = the toy world's held-out split."""
    eval_every: int = 0
    """Evaluate held-out rewards every K iterations (0 = only at the end)."""
    eval_images_per_prompt: int = 4
    output_dir: str = "runs/mixgrpo"
    checkpoint_every: int = 50
    checkpoint_uri: str = ""
    """Mirror every checkpoint and the final weights to this object-store prefix (s3://bucket/run or
    file:///dir); ``--resume`` fetches the newest complete one from there when output_dir has none."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep locally (the newest ones)."""
    mlflow_tracking_uri: str = ""
    """Log metrics to this MLflow server / store as well ("" = off)."""
    mlflow_experiment: str = "mixgrpo"
    mlflow_run_id: str = ""
    """Log into this existing MLflow run (the pipeline creates it before training); "" = start a new run."""
    progress_bar: bool = True
    """A tqdm bar on a terminal; elsewhere one progress line every few iterations."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


MODE_PRESETS: dict[str, dict[str, Any]] = {
    "mixgrpo": {},
    "mixgrpo-flash": {
        "sampling.post_solver": "dpmsolver++",
        "sampling.post_ratio": 0.4,
        "window.shift_interval": 20,
    },
    "mixgrpo-flash-star": {
        "sampling.post_solver": "dpmsolver++",
        "sampling.post_ratio": 0.2,
        "window.strategy": "frozen",
    },
    "dancegrpo": {
        "sampling.sde_type": "dance",
        "sampling.eta": 0.3,
        "sampling.shared_prefix": False,
        "window.strategy": "all",
        "window.train_fraction": 0.6,
    },
    "flow-grpo": {
        "sampling.sde_type": "flow",
        "sampling.eta": 0.7,
        "sampling.shared_prefix": False,
        "window.strategy": "all",
        "window.train_fraction": 1.0,
    },
}


# --------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set_key(cfg: Any, dotted: str, value: Any, *, source: str) -> None:
    """Set ``section.key`` on the nested dataclass ``cfg`` with type checking."""
    parts = dotted.split(".")
    target = cfg
    for depth, part in enumerate(parts):
        hints = _section_types(type(target))
        if part not in hints:
            where = ".".join(parts[:depth]) or "the top level"
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{source}: unknown key {dotted!r} ({part!r} is not in {where}; known keys: {known})")
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: {dotted!r} is a section; give a mapping of its keys")
                for sub_key, sub_value in value.items():
                    _set_key(cfg, f"{dotted}.{sub_key}", sub_value, source=source)
                return
            setattr(target, part, _coerce(value, hints[part], f"{source}: {dotted}"))
            return
        target = getattr(target, part)
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])!r} is not a section")


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(_resolve_hint(dotted)):
            flat.update(_flatten(value, dotted + "."))
            continue
        flat[dotted] = value
    return flat


def _resolve_hint(dotted: str) -> Any:
    cls: Any = TrainConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = _section_types(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-5"`` -> ``("optim.lr", 3e-05)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write it as section.key=value, e.g. optim.lr=3e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: cannot parse the value: {error}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults -> mode preset -> YAML file -> overrides; validated."""
    file_values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        file_values = _flatten(loaded)
    if isinstance(overrides, dict):
        override_values = dict(overrides)
    else:
        override_values = dict(parse_override(item) for item in overrides or [])

    mode = override_values.get("mode", file_values.get("mode", TrainConfig.mode))
    cfg = TrainConfig()
    _set_key(cfg, "mode", mode, source="mode")
    for key, value in MODE_PRESETS[cfg.mode].items():
        _set_key(cfg, key, value, source=f"preset {cfg.mode!r}")
    for key, value in file_values.items():
        _set_key(cfg, key, value, source=str(path))
    for key, value in override_values.items():
        _set_key(cfg, key, value, source="command line")
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    s, w, o = cfg.sampling, cfg.window, cfg.optim
    checks = [
        (s.num_steps >= 2, "sampling.num_steps must be >= 2"),
        (s.group_size >= 2, "sampling.group_size must be >= 2: GRPO normalises rewards inside a group of images of one prompt"),
        (s.eta > 0, "sampling.eta must be > 0 (the window's SDE needs noise)"),
        (not s.shared_prefix or s.init_same_noise, "sampling.shared_prefix needs sampling.init_same_noise=true (the group must start from one noise)"),
        (s.post_solver != "dpmsolver++" or (s.post_ratio is not None and 0 < s.post_ratio <= 1),
         "sampling.post_solver=dpmsolver++ needs sampling.post_ratio in (0, 1] (Flash 0.4, Flash* 0.2)"),
        (s.post_solver == "dpmsolver++" or s.post_ratio is None,
         "sampling.post_ratio only applies to post_solver=dpmsolver++; set sampling.post_ratio=null or post_solver=dpmsolver++"),
        (s.solver_order in (1, 2, 3), "sampling.solver_order must be 1, 2 or 3"),
        (w.strategy == "all" or 1 <= w.size <= s.num_steps - 2, f"window.size must be in [1, num_steps-2={s.num_steps - 2}]"),
        (0 < w.train_fraction <= 1, "window.train_fraction must be in (0, 1]"),
        (cfg.max_iterations >= 0, "max_iterations must be >= 0"),
        (cfg.prompts_per_iteration >= 1, "prompts_per_iteration must be >= 1"),
        (cfg.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = only the final checkpoint)"),
        (cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.clip_range > 0, "optim.clip_range must be > 0"),
        (o.train_batch_size >= 1 and o.gradient_accumulation_steps >= 1, "optim.train_batch_size and gradient_accumulation_steps must be >= 1"),
        (len(cfg.rewards.names) >= 1, "rewards.names must name at least one reward"),
        (cfg.distributed.timeout_s > 0, "distributed.timeout_s must be > 0 seconds"),
        (set(cfg.rewards.weights) <= set(cfg.rewards.names),
         f"rewards.weights names {sorted(set(cfg.rewards.weights) - set(cfg.rewards.names))} that are not in rewards.names {cfg.rewards.names}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return convert(dataclasses.asdict(cfg))


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_hash(cfg: TrainConfig) -> str:
    """Short sha256 of the resolved config (for tags and cache keys)."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by ``config_to_dict`` (e.g. from a checkpoint)."""
    return load_config(overrides=_flatten(values))
