"""What travels with a set of tuned weights: ``mixgrpo_model.json`` (how to rebuild the pipeline) and a
model card (``README.md``: base model and its licence, rewards, held-out metrics, config).

The trainer writes both into ``OUTPUT_DIR/final`` next to the weights; ``mixgrpo sample`` and
:mod:`mixgrpo.model_source` read ``mixgrpo_model.json`` to know the base model the weights belong to.
A toy result is made self-contained (the base's frozen text encoder and ``toy_model.json`` are
copied in), so ``final/`` is itself a toy model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MODEL_INFO = "mixgrpo_model.json"
MODEL_INFO_FORMAT = "mixgrpo-model/1"
FLUX_DEV_LICENSE = ("FLUX.1 [dev] Non-Commercial License "
                    "(https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md); "
                    "weights tuned from it are derivatives under the same licence")
TOY_LICENSE = "Apache-2.0 (the toy base model is pre-trained by mixgrpo itself)"


def model_info(cfg: Any, base_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``mixgrpo_model.json`` of weights trained with ``cfg`` (``base_dir``: the toy base actually used)."""
    from mixgrpo.config import config_to_dict

    lora = cfg.model.kind == "flux" and cfg.model.lora_rank > 0
    return {"format": MODEL_INFO_FORMAT, "model_kind": cfg.model.kind,
            "base_model": cfg.model.path or (str(base_dir) if base_dir else "built-in toy base"),
            "weights": "lora" if lora else "transformer", "mode": cfg.mode, "config": config_to_dict(cfg)}


def read_model_info(directory: str | Path) -> dict[str, Any] | None:
    """``mixgrpo_model.json`` of ``directory``, or None when the weights predate it."""
    path = Path(directory) / MODEL_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info.get("format") != MODEL_INFO_FORMAT:
        raise ValueError(f"{path}: format {info.get('format')!r}, expected {MODEL_INFO_FORMAT!r}")
    return info


def model_card(info: dict[str, Any], held_out_before: dict[str, float], held_out_after: dict[str, float]) -> str:
    """The README.md of a tuned-weights folder (Markdown)."""
    cfg = info["config"]
    kind, base = info["model_kind"], info["base_model"]
    licence = FLUX_DEV_LICENSE if kind == "flux" else TOY_LICENSE
    rows = "\n".join(f"| {name} | {'held-out' if name in cfg['rewards']['held_out'] or name == 'heldout_diversity' else 'optimised'} "
                     f"| {held_out_before.get(name, float('nan')):.4f} | {value:.4f} |" for name, value in held_out_after.items())
    lora = info["weights"] == "lora"
    if kind == "flux":
        load = (f"```python\nimport torch\nfrom diffusers import FluxPipeline\n\n"
                f"pipe = FluxPipeline.from_pretrained(\"{base}\", torch_dtype=torch.bfloat16).to(\"cuda\")\n"
                + ("pipe.load_lora_weights(\"<this folder>\")\n" if lora else
                   "from diffusers import FluxTransformer2DModel\n"
                   "pipe.transformer = FluxTransformer2DModel.from_pretrained(\"<this folder>/transformer\", "
                   "torch_dtype=torch.bfloat16).to(\"cuda\")\n")
                + "image = pipe(\"a photo of a cat\", guidance_scale=3.5, num_inference_steps=25).images[0]\n```")
    else:
        load = "```bash\nmixgrpo sample --model <this folder> --prompt \"a red circle on a black background\" --out grid.png\n```"
    return f"""# MixGRPO-tuned {kind} model

- **Base model:** `{base}`
- **Licence of the base (and of these weights):** {licence}
- **Weights:** {'LoRA (diffusers format, `pytorch_lora_weights.safetensors`)' if lora else 'full transformer (`transformer/`, diffusers layout)'}
- **Training:** mode `{info['mode']}`, {cfg['max_iterations']} iterations, lr {cfg['optim']['lr']}, seed {cfg['seed']},
  {cfg['prompts_per_iteration']} prompts x {cfg['sampling']['group_size']} images per iteration, {cfg['sampling']['num_steps']} sampling steps
- **Optimised rewards:** {', '.join(cfg['rewards']['names'])}; **held-out (never optimised):** {', '.join(cfg['rewards']['held_out']) or 'none'}

## Held-out evaluation by the trainer (held-out prompts, {cfg['eval_images_per_prompt']} fixed seeds each)

| measure | kind | base | tuned |
|---|---|---:|---:|
{rows}

## Load

{load}

Or with mixgrpo: `mixgrpo sample --model <this folder or its s3:// / models:/ URI> --out grid.png`.

## Config

```json
{json.dumps(cfg, indent=1)}
```
"""


def write_model_files(final_dir: str | Path, cfg: Any, held_out_before: dict[str, float],
                      held_out_after: dict[str, float]) -> None:
    """``mixgrpo_model.json`` + ``README.md`` into ``final_dir``; a toy result also gets its base's text encoder."""
    final_dir = Path(final_dir)
    base_dir = None
    if cfg.model.kind == "toy":
        from mixgrpo.toy.pretrain import ensure_base_model

        base_dir = Path(cfg.model.path) if cfg.model.path else Path(ensure_base_model())
        for name in ("toy_model.json", "text_encoder"):  # the text encoder is frozen: the base's is the tuned one's
            source = base_dir / name
            if source.is_dir():
                shutil.copytree(source, final_dir / name, dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy(source, final_dir / name)
    info = model_info(cfg, base_dir)
    (final_dir / MODEL_INFO).write_text(json.dumps(info, indent=1))
    (final_dir / "README.md").write_text(model_card(info, held_out_before, held_out_after))
