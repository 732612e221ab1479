"""Base vs tuned evaluation: same held-out prompts, same seeds, every configured reward.

Writes into ``out_dir``:
  metrics.json        {"base": {reward: mean}, "tuned": {...}, "delta": {...}, "combined": {...}, ...}
  grid.png            rows = prompts; left half base, right half tuned (same seeds, column by column)
  report.md / .html   the table of per-reward deltas and the grid (the HTML embeds the image, so the
                      KFP UI renders it as one artifact)
  rewards.png         reward vs iteration from the training metrics (when given)

Optional hybrid inference: the tuned model for the first ``hybrid_steps`` steps, the base model
for the rest (the late, low-noise steps are where reward hacking lives).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixgrpo.config import TrainConfig
from mixgrpo.images import image_grid, seed_diversity
from mixgrpo.models.base import FlowModel
from mixgrpo.sampling import flow_sigmas, mixed_rollout
from mixgrpo.rewards.base import build_reward
from mixgrpo.train import autocast_context, build_policy, derive_seed, load_prompts, score_phase

# The published reporting scales (spec section 7/9): HPS raw cosine, PickScore /100, ImageReward as its
# library reports it ((r - 0.16717)/1.03334), UnifiedReward's 1-5 alignment score. Training may use others.
REPORTING_OPTIONS: dict[str, dict[str, str]] = {"pickscore": {"normalize": "report"}, "imagereward": {"normalize": "standard"}}


@dataclass
class EvalResult:
    base: dict[str, float]
    tuned: dict[str, float]
    delta: dict[str, float]
    combined: dict[str, float]
    """Mean of the optimised rewards (the default promotion-gate metric), base and tuned."""
    prompts: int
    images_per_prompt: int
    hybrid_steps: int | None
    held_out: list[str] = field(default_factory=list)
    out_dir: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def load_tuned_policy(cfg: TrainConfig, tuned_dir: str | Path, device: torch.device) -> FlowModel:
    """The base adapter of ``cfg`` with the tuned weights of ``tuned_dir`` (full transformer or LoRA)."""
    tuned_dir = Path(tuned_dir)
    check_weights_dir(tuned_dir)
    policy = build_policy(cfg, device)
    if hasattr(policy, "load_tuned"):  # adapters that know their own formats (FLUX: transformer/ or LoRA)
        policy.load_tuned(tuned_dir)
    else:
        transformer_dir = tuned_dir / "transformer" if (tuned_dir / "transformer").is_dir() else tuned_dir
        if not (transformer_dir / "config.json").is_file():
            raise FileNotFoundError(f"{transformer_dir} has no config.json: expected the tuned transformer in diffusers "
                                    "layout (the trainer writes it to OUTPUT_DIR/final/transformer)")
        policy.module = type(policy.module).from_pretrained(transformer_dir).to(device)
    policy.module.eval()
    return policy


WEIGHTS_FIX = ("copy the complete OUTPUT_DIR/final folder again, or fetch CHECKPOINT_URI/final "
               "(mixgrpo.storage.fetch_dir verifies every file), or re-run training")


def check_weights_dir(directory: Path) -> None:
    """Fail with the file and the fix, before any model loads, when a tuned-weights folder is unusable.

    With a ``MANIFEST.json`` (a folder fetched from the store) every listed file is checked (size,
    sha256); then every ``*.json`` must parse, every ``*.safetensors`` header and length must be
    whole, and each folder with a ``config.json`` must hold its weights (``*.safetensors`` or a
    sharded index), or the folder a LoRA file.
    """
    from safetensors import safe_open

    from mixgrpo.storage import MANIFEST_NAME, StorageError, verify_local_dir

    if not directory.is_dir():
        raise FileNotFoundError(f"tuned weights folder {directory} does not exist (no config.json to load): "
                                "pass OUTPUT_DIR/final of a training run")
    if (directory / MANIFEST_NAME).is_file():
        try:
            verify_local_dir(directory)
        except StorageError as error:
            raise ValueError(f"tuned weights: {error}; {WEIGHTS_FIX}") from None
    for file in sorted(directory.rglob("*.json")):
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"tuned weights file {file} is not valid JSON ({error}); {WEIGHTS_FIX}") from None
    for file in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"tuned weights file {file} is not a complete safetensors file ({error}); {WEIGHTS_FIX}") from None
    for config in sorted(directory.rglob("config.json")):
        folder = config.parent
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
            raise FileNotFoundError(f"tuned weights folder {folder} has config.json but no *.safetensors weights "
                                    f"(expected diffusion_pytorch_model.safetensors): the folder is partial; {WEIGHTS_FIX}")


@torch.no_grad()
def generate(policies: list[FlowModel], switch_step: int | None, prompts: list[str], seeds: list[int],
             cfg: TrainConfig, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """ODE samples; ``policies[0]`` for steps < switch_step, ``policies[-1]`` after (hybrid inference)."""
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift).to(device)
    switch_sigma = float(sigmas[switch_step]) if switch_step is not None else -1.0
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        conds = [p.encode_prompts(chunk) for p in policies]
        latents = torch.stack([torch.randn(policies[0].latent_shape(), generator=torch.Generator().manual_seed(s))
                               for s in seeds[start:start + batch_size]]).to(device)

        def velocity_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            which = 0 if float(sigma) > switch_sigma else len(policies) - 1
            with autocast_context(cfg, device):
                return policies[which].velocity(x, sigma, conds[which]).float()

        result = mixed_rollout(velocity_fn, latents, sigmas, range(0, 0), cfg.sampling.eta)
        images.append(policies[-1].decode(result.sample).float().cpu())
    return torch.cat(images)


def evaluate(cfg: TrainConfig, tuned_dir: str | Path, out_dir: str | Path, *, prompts: list[str] | None = None,
             images_per_prompt: int = 2, hybrid_steps: int | None = None, training_metrics: str | Path | None = None,
             grid_prompts: int = 8, device: str | None = None) -> EvalResult:
    """Score base and tuned models on the same held-out prompts and seeds; write the report."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompts if prompts is not None else load_prompts(cfg.eval_prompts, "test")
    if not prompts:
        raise ValueError("no evaluation prompts: give a prompt file with at least one prompt")
    if hybrid_steps is not None and not 0 < hybrid_steps < cfg.sampling.num_steps:
        raise ValueError(f"hybrid_steps must be in (0, {cfg.sampling.num_steps}); got {hybrid_steps}")

    base = build_policy(cfg, dev)
    base.module.eval()
    tuned = load_tuned_policy(cfg, tuned_dir, dev)
    names = list(dict.fromkeys(cfg.rewards.names + cfg.rewards.held_out))
    rewards = {name: build_reward(name, **{**cfg.rewards.options.get(name, {}), **REPORTING_OPTIONS.get(name, {})})
               for name in names}

    rows = [p for p in prompts for _ in range(images_per_prompt)]
    seeds = [derive_seed("eval", i % images_per_prompt) for i in range(len(rows))]
    base_images = generate([base], None, rows, seeds, cfg, dev)
    tuned_images = generate([tuned, base] if hybrid_steps else [tuned], hybrid_steps, rows, seeds, cfg, dev)
    base_scores = {k: float(torch.nanmean(v)) for k, v in score_phase(rewards, base_images, rows).items()}
    tuned_scores = {k: float(torch.nanmean(v)) for k, v in score_phase(rewards, tuned_images, rows).items()}
    base_scores["heldout_diversity"] = seed_diversity(base_images, images_per_prompt)
    tuned_scores["heldout_diversity"] = seed_diversity(tuned_images, images_per_prompt)
    names = names + ["heldout_diversity"]

    def combined(scores: dict[str, float]) -> float:
        return sum(scores[n] for n in cfg.rewards.names) / len(cfg.rewards.names)

    result = EvalResult(
        base=base_scores, tuned=tuned_scores, delta={k: tuned_scores[k] - base_scores[k] for k in names},
        combined={"base": combined(base_scores), "tuned": combined(tuned_scores)},
        prompts=len(prompts), images_per_prompt=images_per_prompt, hybrid_steps=hybrid_steps,
        held_out=list(cfg.rewards.held_out), out_dir=str(out),
    )
    (out / "metrics.json").write_text(result.to_json())
    shown = min(grid_prompts, len(prompts)) * images_per_prompt
    grid = side_by_side_grid(base_images[:shown], tuned_images[:shown], images_per_prompt, prompts[:grid_prompts])
    grid.save(out / "grid.png")
    if training_metrics and Path(training_metrics).is_file():
        plot_training_rewards(training_metrics, out / "rewards.png")
    write_report(result, out)
    return result


def side_by_side_grid(base: torch.Tensor, tuned: torch.Tensor, per_prompt: int, prompts: list[str]):
    """Rows = prompts; columns = base images then tuned images (same seeds in the same order)."""
    rows = []
    for r in range(len(prompts)):
        rows.append(base[r * per_prompt:(r + 1) * per_prompt])
        rows.append(tuned[r * per_prompt:(r + 1) * per_prompt])
    interleaved = torch.cat([torch.cat(rows[i:i + 2]) for i in range(0, len(rows), 2)])
    labels = [f"base x{per_prompt}" for _ in range(per_prompt)] + [f"tuned x{per_prompt}" for _ in range(per_prompt)]
    return image_grid(interleaved, columns=2 * per_prompt, scale=3, row_labels=prompts, label_width=230,
                      column_labels=[label if i % per_prompt == 0 else "" for i, label in enumerate(labels)])


def plot_training_rewards(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Reward means vs iteration (and held-out evaluations as markers) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    train_records = [r for r in records if "rewards" in r]
    for name in (train_records[0]["rewards"] if train_records else {}):
        ax.plot([r["iteration"] for r in train_records], [r["rewards"][name]["mean"] for r in train_records],
                label=f"{name} (rollouts)", alpha=0.6)
    held = [r for r in records if "held_out" in r]
    for name in (held[0]["held_out"] if held else {}):
        ax.plot([r["iteration"] for r in held], [r["held_out"][name] for r in held], "o--", label=f"{name} (held-out)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def metrics_table(result: EvalResult) -> str:
    lines = ["| reward | base | tuned | delta |", "|---|---:|---:|---:|"]
    for name in result.base:
        tag = " (held-out, not optimised)" if name in result.held_out or name == "heldout_diversity" else ""
        lines.append(f"| {name}{tag} | {result.base[name]:.4f} | {result.tuned[name]:.4f} | {result.delta[name]:+.4f} |")
    lines.append(f"| **combined (mean of optimised)** | {result.combined['base']:.4f} | {result.combined['tuned']:.4f} | "
                 f"{result.combined['tuned'] - result.combined['base']:+.4f} |")
    return "\n".join(lines)


def write_report(result: EvalResult, out: Path) -> None:
    hybrid = f"hybrid inference: tuned for the first {result.hybrid_steps} steps, base after" if result.hybrid_steps else "tuned model for every step"
    header = (f"# Evaluation: base vs tuned\n\n{result.prompts} held-out prompts x {result.images_per_prompt} images, "
              f"same seeds for both models; {hybrid}.\n\n")
    table = metrics_table(result)
    (out / "report.md").write_text(header + table + "\n\n![base vs tuned](grid.png)\n"
                                   + ("\n![rewards](rewards.png)\n" if (out / "rewards.png").is_file() else ""))
    images = "".join(f'<h3>{title}</h3><img src="data:image/png;base64,{_b64(out / name)}" style="image-rendering:pixelated;max-width:100%">'
                     for title, name in (("Base (left) vs tuned (right), same seeds", "grid.png"), ("Rewards during training", "rewards.png"))
                     if (out / name).is_file())
    rows = "".join(f"<tr><td>{line.split('|')[1]}</td>{''.join(f'<td>{c.strip()}</td>' for c in line.split('|')[2:5])}</tr>"
                   for line in table.splitlines()[2:])
    (out / "report.html").write_text(
        "<html><body style='font-family:sans-serif'><h2>Evaluation: base vs tuned</h2>"
        f"<p>{result.prompts} held-out prompts x {result.images_per_prompt} images, same seeds; {hybrid}.</p>"
        f"<table border=1 cellpadding=4><tr><th>reward</th><th>base</th><th>tuned</th><th>delta</th></tr>{rows}</table>{images}</body></html>")


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
