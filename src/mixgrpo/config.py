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
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mixgrpo.grpo import Mix, OnFailure
from mixgrpo.sampling import PostSolver, SdeType
from mixgrpo.solvers import SolverType
from mixgrpo.window import Strategy

Mode = Literal["mixgrpo", "mixgrpo-flash", "mixgrpo-flash-star", "dancegrpo", "all-sde"]
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
    sde_type: SdeType = "flow"
    """Step rule inside the window: Flow-GRPO/MixGRPO SDE or the DanceGRPO SDE."""
    group_size: int = 12
    """N, images per prompt; their rewards are normalised together."""
    init_same_noise: bool = True
    """All N images of a group start from the same initial noise (as the reference)."""
    shared_prefix: bool = True
    """Compute the ODE steps before the window once per group (needs init_same_noise)."""
    post_solver: PostSolver = "euler"
    """ODE solver after the window; dpmsolver++ with post_ratio gives MixGRPO-Flash."""
    solver_order: int = 2
    solver_type: SolverType = "midpoint"
    post_ratio: float | None = None
    """Fraction of post-window steps kept by the compressed schedule (Flash 0.4, Flash* 0.2)."""
    decode_pred_x0: bool = False
    """Score the x0 prediction of the last step (``x - sigma*v``) instead of the last sample, as DanceGRPO
    does (its ``pred_original``); on for mode dancegrpo, whose last SDE step leaves noise in the sample."""


@dataclass
class WindowConfig:
    strategy: Literal[Strategy, "all"] = "progressive"
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
    min_left: int = 0
    """Lowest left edge the window takes (frozen: where it stays). Not in the paper; 0 = from the first step."""
    max_left: int = -1
    """Highest left edge before the window rolls back to ``min_left`` (at most num_steps - 3); -1 = num_steps - 3
    (the paper's range)."""
    train_fraction: float = 1.0
    """For strategy "all": fraction of the T-1 transitions trained per micro-batch (DanceGRPO 0.6)."""


@dataclass
class RewardConfig:
    names: list[str] = field(default_factory=lambda: ["toy_object_color", "toy_background", "toy_shape"])
    """Registered reward names (see ``mixgrpo rewards list``)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weight per reward name; empty = equal weights. Normalised to sum to 1."""
    mix: Mix = "advantage"
    """"advantage": normalise each reward in its group, then weighted mean; "reward": weighted sum, then normalise."""
    advantage_clip: float = 5.0
    on_failure: OnFailure = "mask"
    """A reward that fails for a sample is masked out of the statistics, or stops the run."""
    held_out: list[str] = field(default_factory=lambda: ["toy_heldout_realism"])
    """Measured every iteration but never optimised (to spot reward hacking)."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments per reward name (e.g. weight directories, endpoints)."""
    max_failed_fraction: float = 0.5
    """Stop the run when more than this fraction of an optimised reward's samples failed (NaN) over
    the last ``failure_window`` iterations, or when every sample of one iteration failed (1 = never
    stop on a partial outage; a total outage of one iteration always stops)."""
    failure_window: int = 5
    """Iterations over which ``max_failed_fraction`` is measured."""


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
    mix_prompts: bool = False
    """Each micro-batch takes ``train_batch_size / G`` samples of every one of the process's G prompts (as G
    ranks with one prompt each would), so every optimiser step averages all prompts instead of one group."""
    clip_range: float = 1e-4
    """PPO clip epsilon on the probability ratio."""
    kl_coeff: float = 0.0
    """Weight of the KL-to-old term 0.5*(logp_new-logp_old)^2."""
    kl_ref_coeff: float = 0.0
    """beta of the KL to a frozen copy of the base policy, (mu - mu_ref)^2/(2 s^2) per trained step
    (Flow-GRPO's regulariser, 0.04 there); 0 = off, as in MixGRPO. Costs one extra forward per trained step."""
    anchor_coeff: float = 0.0
    """Weight of the anchor on the steps *after* the window, which MixGRPO never trains but whose behaviour moves
    with the shared weights: per trajectory, one state ``(1 - s) x0 + s eps`` of its final sample at a sigma ``s``
    drawn from the steps after the window, loss ``mean((x0_pred - x0_pred_ref)^2)`` to the frozen base
    (``grpo.reference_anchor``). 0 = off (not in the paper). Costs two forwards (one with backward) per micro-batch."""
    anchor_steps: int = 0
    """The anchor's states come from the last ``anchor_steps`` steps of the schedule that are after the window
    (0 = every step after the window). Anchoring every later step also holds back the steps the window reaches later."""
    ema_decay: float = 0.0
    """Average the trained weights, ``ema <- d * ema + (1 - d) * theta`` after every iteration's update
    (``mixgrpo.ema``; Flow-GRPO evaluates such an EMA): the evaluations, the best-checkpoint selection and the final
    weights use the average, the rollouts the live weights. 0 = off (as in MixGRPO). engine none or ddp only."""


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
    (``pip install -e '.[distributed]'``; launch files shipped in the package's
    presets/accelerate/zero*.yaml and presets/deepspeed/; its checkpoints hold the weights but not the ZeRO optimiser shards, so a
    DeepSpeed run cannot be resumed yet -- use fsdp for resumable sharded runs)."""
    zero_stage: Literal[2, 3] = 2
    """engine=deepspeed: ZeRO stage; picks the shipped presets/deepspeed/zero{stage}.json unless deepspeed_config is set."""
    deepspeed_config: str = ""
    """engine=deepspeed: DeepSpeed JSON config; "" = the shipped presets/deepspeed/zero{zero_stage}.json."""
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
    """Seeds per held-out prompt in the trainer's evaluations (and for best-checkpoint selection)."""
    validation_prompts: str = ""
    """Prompts for best-checkpoint selection and early stopping (never trained on, never reported);
    "" = the toy world's validation split."""
    select_best: bool = False
    """Evaluate on the validation prompts at the start, every ``eval_every`` iterations and at the end, and write the best evaluation's
    weights to final/ (not the last): best combined optimised reward among the evaluations whose never-optimised
    measures hold (diversity >= ``selection_min_diversity`` x the base's, each held-out reward >= base - ``selection_tolerance``)."""
    selection_min_diversity: float = 0.8
    """select_best: an evaluation qualifies only if its seed diversity keeps this fraction of the base's."""
    selection_tolerance: float = 0.01
    """select_best: how far a held-out (never optimised) reward may fall below the base's and still qualify."""
    early_stop_patience: int = 0
    """Stop when ``early_stop_patience`` validation evaluations in a row bring no new best (0 = never; needs
    select_best; with eval_every 0 there are no evaluations between the base and the end, so it never stops)."""
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
        "sampling.decode_pred_x0": True,
        "window.strategy": "all",
        "window.train_fraction": 0.6,
    },
    # MixGRPO's SDE at every step with every transition trained: an ablation of the window, not
    # Flow-GRPO's recipe (10 steps, KL to a reference, EMA); named for what it is.
    "all-sde": {
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


# Package data: run presets (toy.yaml, by name) and the engines' launch files (accelerate/, deepspeed/).
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def resolve_config_path(path: str | Path) -> Path:
    """A config file's path; a bare name such as ``toy`` is a preset shipped with the package (presets/toy.yaml)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    preset = PRESET_DIR / f"{path}.yaml"
    if "/" not in str(path) and not str(path).endswith((".yaml", ".yml")) and preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {candidate} does not exist (shipped presets, by name: {presets})")


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults -> mode preset -> YAML file -> overrides; validated."""
    file_values: dict[str, Any] = {}
    if path:
        path = resolve_config_path(path)
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
        (o.kl_ref_coeff >= 0, "optim.kl_ref_coeff must be >= 0 (0 = no KL to the reference policy)"),
        (o.anchor_coeff >= 0, "optim.anchor_coeff must be >= 0 (0 = no anchor after the window)"),
        (o.anchor_steps >= 0, "optim.anchor_steps must be >= 0 (0 = every step after the window)"),
        (0 <= cfg.selection_min_diversity <= 1, "selection_min_diversity must be in [0, 1] (a fraction of the base's diversity)"),
        (cfg.selection_tolerance >= 0, "selection_tolerance must be >= 0"),
        (cfg.early_stop_patience >= 0, "early_stop_patience must be >= 0 (0 = never stop early)"),
        (cfg.early_stop_patience == 0 or cfg.select_best,
         "early_stop_patience needs select_best=true (it counts validation evaluations without a new best)"),
        (cfg.max_iterations >= 0, "max_iterations must be >= 0"),
        (cfg.prompts_per_iteration >= 1, "prompts_per_iteration must be >= 1"),
        (cfg.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = only the final checkpoint)"),
        (cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.clip_range > 0, "optim.clip_range must be > 0"),
        (o.train_batch_size >= 1 and o.gradient_accumulation_steps >= 1, "optim.train_batch_size and gradient_accumulation_steps must be >= 1"),
        (not o.mix_prompts or (o.train_batch_size % cfg.prompts_per_iteration == 0
                               and s.group_size % (o.train_batch_size // cfg.prompts_per_iteration or 1) == 0
                               and o.train_batch_size >= cfg.prompts_per_iteration),
         "optim.mix_prompts needs optim.train_batch_size = k x prompts_per_iteration with k dividing sampling.group_size"),
        (len(cfg.rewards.names) >= 1, "rewards.names must name at least one reward"),
        (cfg.distributed.timeout_s > 0, "distributed.timeout_s must be > 0 seconds"),
        (set(cfg.rewards.weights) <= set(cfg.rewards.names),
         f"rewards.weights names {sorted(set(cfg.rewards.weights) - set(cfg.rewards.names))} that are not in rewards.names {cfg.rewards.names}"),
    ]
    checks += value_range_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_finite(cfg)
    check_reward_names(cfg)


def value_range_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message naming the key) for every numeric key with a bounded range."""
    s, w, o, r, m = cfg.sampling, cfg.window, cfg.optim, cfg.rewards, cfg.model
    return [
        (o.max_grad_norm > 0, f"optim.max_grad_norm={o.max_grad_norm} must be > 0 (a negative norm flips the gradient's sign)"),
        (all(0 <= b < 1 for b in o.betas), f"optim.betas={list(o.betas)}: both must be in [0, 1)"),
        (o.eps > 0, f"optim.eps={o.eps} must be > 0"),
        (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0"),
        (o.kl_coeff >= 0, f"optim.kl_coeff={o.kl_coeff} must be >= 0"),
        (0 <= o.ema_decay < 1, f"optim.ema_decay={o.ema_decay} must be in [0, 1) (0 = off; 0.9 averages ~10 iterations)"),
        (o.ema_decay == 0 or cfg.distributed.engine in ("none", "ddp"),
         f"optim.ema_decay needs replicated weights: distributed.engine none or ddp, not {cfg.distributed.engine} "
         "(add optim.ema_decay=0 to train without the weight average; the toy preset sets 0.95)"),
        (o.clip_range < 1, f"optim.clip_range={o.clip_range} must be < 1 (ratios are clipped to [1-eps, 1+eps])"),
        (cfg.eval_images_per_prompt >= 1, f"eval_images_per_prompt={cfg.eval_images_per_prompt} must be >= 1"),
        (cfg.eval_every >= 0, f"eval_every={cfg.eval_every} must be >= 0 (0 = only at the end)"),
        (s.shift > 0, f"sampling.shift={s.shift} must be > 0"),
        (w.shift_interval >= 1, f"window.shift_interval={w.shift_interval} must be >= 1 iteration"),
        (w.stride >= 0, f"window.stride={w.stride} must be >= 0 (0 keeps the window at the first step)"),
        (w.interval_min >= 1, f"window.interval_min={w.interval_min} must be >= 1 iteration"),
        (w.interval_max >= w.interval_min, f"window.interval_max={w.interval_max} must be >= window.interval_min={w.interval_min}"),
        (w.max_left >= -1, f"window.max_left={w.max_left} must be >= 0, or -1 (no bound)"),
        (w.min_left >= 0 and (w.max_left < 0 or w.min_left <= w.max_left),
         f"window.min_left={w.min_left} must be in [0, window.max_left={w.max_left}] (max_left -1: >= 0)"),
        (r.advantage_clip > 0, f"rewards.advantage_clip={r.advantage_clip} must be > 0 (advantages are clamped to +-clip)"),
        (all(v >= 0 for v in r.weights.values()) and (not r.weights or sum(r.weights.values()) > 0),
         f"rewards.weights={r.weights}: weights must be >= 0 and not all 0"),
        (len(set(r.names)) == len(r.names), f"rewards.names={r.names} names a reward twice"),
        (0 <= r.max_failed_fraction <= 1, f"rewards.max_failed_fraction={r.max_failed_fraction} must be in [0, 1]"),
        (r.failure_window >= 1, f"rewards.failure_window={r.failure_window} must be >= 1 iteration"),
        (m.height > 0 and m.height % 16 == 0, f"model.height={m.height} must be a positive multiple of 16"),
        (m.width > 0 and m.width % 16 == 0, f"model.width={m.width} must be a positive multiple of 16"),
        (m.max_sequence_length >= 1, f"model.max_sequence_length={m.max_sequence_length} must be >= 1"),
        (m.lora_rank >= 0, f"model.lora_rank={m.lora_rank} must be >= 0 (0 = full fine-tuning)"),
        (m.lora_alpha is None or m.lora_alpha > 0, f"model.lora_alpha={m.lora_alpha} must be > 0 (or null = lora_rank)"),
    ]


def check_finite(section: Any, prefix: str = "") -> None:
    """Every float in the config (nested sections, tuples, dicts) is finite: ``nan``/``inf`` name their key."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, key + ".")
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}{'' if index is None else f'[{index}]'}={item} must be a finite number")


def check_reward_names(cfg: TrainConfig) -> None:
    """``rewards.names``, ``rewards.held_out`` and the keys of ``rewards.options`` are registered rewards."""
    from mixgrpo.rewards.base import available_rewards

    known = available_rewards()
    for key, names in (("rewards.names", cfg.rewards.names), ("rewards.held_out", cfg.rewards.held_out),
                       ("rewards.options", list(cfg.rewards.options))):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ConfigError(f"{key}: unknown reward {', '.join(map(repr, unknown))}; known rewards: {', '.join(known)} "
                              "(see `mixgrpo rewards list`)")


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


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as ``{"section.key": value}`` (mappings such as ``rewards.weights`` stay values)."""
    return _flatten(config_to_dict(cfg))


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by ``config_to_dict`` (e.g. from a checkpoint)."""
    return load_config(overrides=_flatten(values))
