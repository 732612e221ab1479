"""FLUX.1 adapter: the ``FlowModel`` interface over a diffusers-format FLUX.1-dev directory.

Components (the ``model_index.json`` layout of black-forest-labs/FLUX.1-dev)::

    transformer/     FluxTransformer2DModel  (the policy; trained fully or through LoRA)
    vae/             AutoencoderKL, 16 latent channels (frozen)
    text_encoder/    CLIPTextModel + tokenizer/     -> pooled vector (frozen)
    text_encoder_2/  T5EncoderModel + tokenizer_2/  -> token states, max 512 tokens (frozen)

Latents live packed, as FLUX's transformer reads them: the VAE latent (16, h, w) with
h = H/8, w = W/8 is cut into 2x2 patches, giving (h/2 * w/2) tokens of 64 channels
(720x720: 16x90x90 -> 2025 x 64). Position ids: image token (r, c) has id (0, r, c); text tokens 0.

Conventions (spec section 2):
- the transformer's timestep input is ``int(1000*sigma)/1000`` (it multiplies by 1000 inside);
- guidance-distilled: one forward per step with the guidance embedding fixed at 3.5, no CFG;
- decode: ``vae.decode(latents / scaling_factor + shift_factor)`` (FLUX: /0.3611 + 0.1159), then
  ``x/2 + 1/2`` clamped to [0, 1].

Dtypes: the frozen parts (VAE, encoders) run in bf16 on CUDA and float32 on CPU ("auto"); the
transformer is float32 by default (the trainer's autocast computes in bf16) or bf16 when asked, in
which case LoRA weights stay float32. Prompt embeddings are cached on disk (``PromptEmbeddingCache``),
and the text encoders are only loaded when a prompt misses the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixgrpo.config import ModelConfig
from mixgrpo.models.base import Conditioning

log = logging.getLogger(__name__)

GUIDANCE = ModelConfig.guidance  # FLUX.1-dev's distilled guidance input (the defaults live in ModelConfig)
MAX_SEQUENCE_LENGTH = ModelConfig.max_sequence_length
# The attention projections of FLUX's double-stream blocks (image and text streams) and of its
# single-stream blocks (to_q/k/v there too), as diffusers' FLUX LoRA scripts target them.
LORA_TARGET_MODULES = tuple(ModelConfig().lora_target_modules)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default, found by load_lora_weights
CACHE_FORMAT = "mixgrpo-prompt-embeddings/1"
CACHE_ENV = "MIXGRPO_CACHE_DIR"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
DType = Literal["auto", "float32", "bfloat16"]


# --------------------------------------------------------------------------- settings


@dataclass
class FluxSettings(ModelConfig):
    """How to load and run FLUX: the run's :class:`~mixgrpo.config.ModelConfig` (image size, guidance, T5
    length, LoRA, dtypes, embedding cache; defaults: the paper's 720x720, guidance 3.5, T5 512) plus
    the loader's own knobs below. ``from_pretrained`` takes the path it loads separately."""

    frozen_dtype: DType = "auto"  # VAE and encoders; auto = bf16 on CUDA, float32 elsewhere
    decode_batch_size: int = 4  # images per VAE decode call (memory bound at 720x720)
    download_dir: str = ""  # local copy of s3:// / file:// models; "" = $MIXGRPO_CACHE_DIR/models or ~/.cache/mixgrpo/models

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                raise ValueError(f"FluxSettings.{name}={value} must be a positive multiple of 16 (8x VAE x 2x2 packing)")
        if self.lora_rank < 0:
            raise ValueError(f"FluxSettings.lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tuning)")
        if self.max_sequence_length < 1 or self.decode_batch_size < 1:
            raise ValueError("FluxSettings.max_sequence_length and decode_batch_size must be >= 1")


def resolve_dtype(name: DType | str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on CUDA, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {name!r} must be 'auto', 'float32' or 'bfloat16'")
    return getattr(torch, name)


# --------------------------------------------------------------------------- model directory


def default_download_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "mixgrpo")
    return Path(root) / "models"


def resolve_model_dir(path: str | os.PathLike[str], download_dir: str | os.PathLike[str] = "") -> Path:
    """A local diffusers directory for ``path``: a directory as is, or a published s3:// / file:// prefix
    fetched (once, checked against its MANIFEST.json sha256s) into ``download_dir/<hash of the URI>``."""
    text = str(path)
    if text.startswith(("s3://", "file://")):
        from mixgrpo.storage import fetch_dir

        local = Path(download_dir or default_download_dir()) / hashlib.sha256(text.encode()).hexdigest()[:16]
        fetch_dir(text, local)
        directory = local
    else:
        directory = Path(text)
    if not (directory / "model_index.json").is_file() and not (directory / "transformer").is_dir():
        raise FileNotFoundError(
            f"{path} is not a diffusers FLUX directory (no model_index.json or transformer/); "
            "pass the directory written by FluxPipeline.save_pretrained or its published s3:// prefix"
        )
    return directory


# --------------------------------------------------------------------------- packing


def latent_grid(settings: FluxSettings, vae_scale_factor: int = 8) -> tuple[int, int]:
    """(h, w) of the unpacked VAE latent: ``2*(H // (2*scale))``, as FluxPipeline computes it."""
    return 2 * (settings.height // (2 * vae_scale_factor)), 2 * (settings.width // (2 * vae_scale_factor))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2*w/2, 4C): 2x2 patches, channel order (c, patch row, patch column)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2*w/2, 4C) -> (B, C, h, w), the inverse of ``pack_latents`` (h, w: the latent grid)."""
    b, tokens, channels = packed.shape
    if tokens != (height // 2) * (width // 2) or channels % 4:
        raise ValueError(f"packed latents {tuple(packed.shape)} do not match a {height}x{width} latent grid")
    patches = packed.reshape(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX's image position ids for a (height/2, width/2) token grid: rows (0, r, c), shape (tokens, 3)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2).view(-1, 1)
    ids[..., 2] = torch.arange(width // 2).view(1, -1)
    return ids.reshape(-1, 3)


def truncate_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input: ``int(1000*sigma)/1000`` (spec section 2)."""
    return torch.trunc(sigma.float() * 1000) / 1000


# --------------------------------------------------------------------------- text encoders


def encoder_fingerprint(model_dir: Path, max_sequence_length: int) -> str:
    """sha256 over the encoders' configs, the tokenizer files, the weight files' names and sizes and the
    T5 length: what decides the embeddings (weights are identified by size, not hashed: T5-XXL is 9 GB)."""
    digest = hashlib.sha256(f"max_sequence_length={max_sequence_length}\n".encode())
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        folder = model_dir / sub
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: {model_dir} is not a complete FLUX directory")
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            weights = file.suffix in (".safetensors", ".bin")
            digest.update(f"{file.relative_to(model_dir)}:{file.stat().st_size}\n".encode())
            if not weights:
                digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass
class TextEncoders:
    """CLIP (pooled vector) and T5 (token states) with their tokenizers, frozen, as FluxPipeline uses them."""

    clip: torch.nn.Module
    clip_tokenizer: object
    t5: torch.nn.Module
    t5_tokenizer: object
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    @classmethod
    def load(cls, model_dir: Path, device: torch.device, dtype: torch.dtype,
             max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> TextEncoders:
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        clip = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=dtype).to(device)
        t5 = T5EncoderModel.from_pretrained(model_dir / "text_encoder_2", torch_dtype=dtype).to(device)
        for module in (clip, t5):
            module.requires_grad_(False).eval()
        return cls(clip, CLIPTokenizer.from_pretrained(model_dir / "tokenizer"), t5,
                   T5TokenizerFast.from_pretrained(model_dir / "tokenizer_2"), max_sequence_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """T5 states (B, max_sequence_length, D) and CLIP's pooled output (B, D'), in the encoders' dtype."""
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, return_tensors="pt").input_ids
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        states = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False)[0]
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        return {"encoder_hidden_states": states, "pooled_projections": pooled}


# --------------------------------------------------------------------------- embedding cache


def prompt_key(prompt: str) -> str:
    """The cache key of a prompt: sha256 of its UTF-8 text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class PromptEmbeddingCache:
    """Prompt embeddings on disk, in safetensors shards keyed by prompt hash.

    Layout: ``cache.json`` (format, encoder fingerprint) and ``shard-*.safetensors``, each holding
    ``encoder_hidden_states`` (n, L, D) and ``pooled_projections`` (n, D') for the n prompts named in
    its metadata (``keys``, ``prompts``: JSON lists). There is no shared index file: shards are
    written under unique names by an atomic rename and the index is rebuilt from their headers, so
    several processes may add to one cache at once (a prompt stored twice is harmless).
    """

    def __init__(self, directory: str | os.PathLike[str], fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_or_write_meta()
        self.index: dict[str, tuple[Path, int]] = {}
        self.refresh()

    def _check_or_write_meta(self) -> None:
        meta_path = self.directory / "cache.json"
        meta = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint}
        if not meta_path.is_file():
            tmp = meta_path.with_name(f".cache.json.{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_path)
        found = json.loads(meta_path.read_text())
        if found != meta:
            raise ValueError(
                f"{meta_path} belongs to other text encoders or another max_sequence_length "
                f"(fingerprint {found.get('fingerprint')!r}, expected {self.fingerprint!r}); "
                "point embedding_cache_dir at a fresh directory or delete this one"
            )

    def refresh(self) -> None:
        """Re-read the shard headers (picks up shards written by other processes)."""
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                keys = json.loads(f.metadata()["keys"])
            for row, key in enumerate(keys):
                self.index.setdefault(key, (shard, row))

    def __contains__(self, prompt: str) -> bool:
        return prompt_key(prompt) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, prompts: list[str]) -> Conditioning:
        """Stacked embeddings of ``prompts`` (all must be cached), in the stored dtype, on the CPU."""
        rows: dict[str, list[torch.Tensor]] = {"encoder_hidden_states": [], "pooled_projections": []}
        for prompt in prompts:
            key = prompt_key(prompt)
            if key not in self.index:
                raise KeyError(f"prompt {prompt!r} is not in the embedding cache {self.directory}")
            shard, row = self.index[key]
            with safe_open(str(shard), "pt") as f:
                for name in rows:
                    rows[name].append(f.get_slice(name)[row : row + 1])
        return {name: torch.cat(values) for name, values in rows.items()}

    def put(self, prompts: list[str], embeddings: Conditioning) -> Path:
        """Write one shard with the given prompts' embeddings; returns its path."""
        keys = [prompt_key(p) for p in prompts]
        name = f"shard-{hashlib.sha256(''.join(keys).encode()).hexdigest()[:16]}-{uuid.uuid4().hex[:8]}.safetensors"
        path = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        tensors = {k: v.detach().contiguous().cpu() for k, v in embeddings.items()}
        save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys), "prompts": json.dumps(prompts)})
        os.replace(tmp, path)
        for row, key in enumerate(keys):
            self.index.setdefault(key, (path, row))
        return path


@dataclass(frozen=True)
class PrecomputeResult:
    """What ``precompute_prompt_embeddings`` did."""

    directory: Path
    encoded: int  # distinct prompts encoded now
    cached: int  # distinct prompts already in the cache
    shards: list[Path] = field(default_factory=list)  # shards written now


def precompute_prompt_embeddings(
    model_dir: str | os.PathLike[str],
    prompts: list[str],
    out_dir: str | os.PathLike[str],
    shard_size: int = 256,
    *,
    batch_size: int = 8,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    device: str | torch.device | None = None,
    dtype: DType = "auto",
    download_dir: str = "",
) -> PrecomputeResult:
    """Encode the distinct ``prompts`` not yet in ``out_dir`` into shards of ``shard_size`` prompts.

    ``model_dir`` is a FLUX directory or a published s3:// / file:// prefix; only the text encoders are
    loaded (CUDA when available). ``out_dir`` can then be used as ``FluxSettings.embedding_cache_dir``.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    directory = resolve_model_dir(model_dir, download_dir)
    cache = PromptEmbeddingCache(out_dir, encoder_fingerprint(directory, max_sequence_length))
    distinct = list(dict.fromkeys(prompts))
    missing = [p for p in distinct if p not in cache]
    shards: list[Path] = []
    if missing:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        encoders = TextEncoders.load(directory, dev, resolve_dtype(dtype, dev), max_sequence_length)
        for start in range(0, len(missing), shard_size):
            chunk = missing[start : start + shard_size]
            parts = [encoders.encode(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)]
            shards.append(cache.put(chunk, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}))
            log.info("prompt embeddings: %d / %d encoded", start + len(chunk), len(missing))
    return PrecomputeResult(Path(out_dir), len(missing), len(distinct) - len(missing), shards)


# --------------------------------------------------------------------------- the adapter


class FluxFlowModel:
    """``FlowModel`` adapter for FLUX.1 (see the module docstring). Build it with ``from_pretrained``."""

    def __init__(self, model_dir: Path, transformer: torch.nn.Module, vae: torch.nn.Module,
                 settings: FluxSettings, device: torch.device):
        self.model_dir = model_dir
        self.module = transformer
        self.vae = vae
        self.settings = settings
        self.frozen_dtype = resolve_dtype(settings.frozen_dtype, device)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.grid = latent_grid(settings, self.vae_scale_factor)
        self._img_ids = latent_image_ids(*self.grid)
        self._text: TextEncoders | None = None  # loaded on the first cache miss
        self.encoder_calls = 0  # prompts actually run through the text encoders (cache misses)
        fingerprint = encoder_fingerprint(model_dir, settings.max_sequence_length)
        self.cache = PromptEmbeddingCache(settings.embedding_cache_dir, fingerprint) if settings.embedding_cache_dir else None
        self._memory: dict[str, Conditioning] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], settings: FluxSettings | None = None,
                        device: str | torch.device = "cpu", tuned: str | os.PathLike[str] | None = None) -> FluxFlowModel:
        """Load from a diffusers FLUX directory or s3:// / file:// prefix.

        ``tuned``: a directory written by ``save_pretrained`` (its ``transformer/`` replaces the base one,
        or its LoRA weights are loaded into the base transformer).
        """
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        settings = settings or FluxSettings()
        device = torch.device(device)
        model_dir = resolve_model_dir(path, settings.download_dir)
        dtype = getattr(torch, settings.transformer_dtype)
        full = tuned is not None and (Path(tuned) / "transformer" / "config.json").is_file()
        transformer_dir = Path(tuned) / "transformer" if full else model_dir / "transformer"  # one load of 24 GB, not two
        transformer = FluxTransformer2DModel.from_pretrained(transformer_dir, torch_dtype=dtype).to(device)
        frozen = resolve_dtype(settings.frozen_dtype, device)
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=frozen).to(device)
        vae.requires_grad_(False).eval()
        model = cls(model_dir, transformer, vae, settings, device)
        if tuned is not None and not full:
            model.load_tuned(tuned)
        elif settings.lora_rank > 0:
            model.add_lora()
        if settings.gradient_checkpointing:
            model.module.enable_gradient_checkpointing()
        return model

    def load_tuned(self, directory: str | os.PathLike[str]) -> None:
        """Load what ``save_pretrained`` wrote: ``transformer/`` replaces the transformer, or the LoRA weights
        (``pytorch_lora_weights.safetensors``) go into the base transformer (trainable, ready to continue)."""
        from diffusers import FluxTransformer2DModel

        directory = Path(directory)
        if (directory / LORA_WEIGHT_NAME).is_file():
            self.load_lora(directory)
        elif (directory / "transformer" / "config.json").is_file():
            device, dtype = self.device, getattr(torch, self.settings.transformer_dtype)
            self.module = FluxTransformer2DModel.from_pretrained(directory / "transformer", torch_dtype=dtype).to(device)
        else:
            raise FileNotFoundError(
                f"{directory} has neither transformer/config.json nor {LORA_WEIGHT_NAME}: "
                "pass a directory written by FluxFlowModel.save_pretrained"
            )

    # ---- LoRA

    @property
    def uses_lora(self) -> bool:
        return bool(getattr(self.module, "peft_config", None))

    def add_lora(self) -> None:
        """Freeze the transformer and add a fresh LoRA adapter (B = 0: the outputs do not change)."""
        from peft import LoraConfig

        s = self.settings
        if s.lora_rank < 1:
            raise ValueError("add_lora needs FluxSettings.lora_rank >= 1")
        config = LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha or s.lora_rank,
                            target_modules=list(s.lora_target_modules), init_lora_weights=True)
        self.module.requires_grad_(False)
        self.module.add_adapter(config)
        self._lora_params_trainable()

    def load_lora(self, directory: str | os.PathLike[str]) -> None:
        """Load LoRA weights written by ``save_pretrained`` (diffusers format, alpha from its metadata)."""
        from diffusers import FluxPipeline

        state, metadata = FluxPipeline.lora_state_dict(str(directory), return_lora_metadata=True)
        self.module.requires_grad_(False)
        FluxPipeline.load_lora_into_transformer(state, network_alphas=None, transformer=self.module,
                                               adapter_name="default", metadata=metadata)
        self._lora_params_trainable()

    def _lora_params_trainable(self) -> None:
        for name, param in self.module.named_parameters():
            param.requires_grad_("lora_" in name)
            if param.requires_grad:
                param.data = param.data.float()  # LoRA weights train in float32 even on a bf16 base

    # ---- FlowModel

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def latent_shape(self) -> tuple[int, ...]:
        """Packed latent of one image: (h/2 * w/2, 4 * latent channels); 720x720 -> (2025, 64)."""
        h, w = self.grid
        return ((h // 2) * (w // 2), 4 * self.vae.config.latent_channels)

    def text_encoders(self) -> TextEncoders:
        """The CLIP and T5 encoders, loaded on first use (on the transformer's device)."""
        if self._text is None:
            self._text = TextEncoders.load(self.model_dir, self.device, self.frozen_dtype, self.settings.max_sequence_length)
        return self._text

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """T5 states and pooled CLIP per prompt, from the cache (disk, then memory) or the encoders."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._memory and not (self.cache and p in self.cache)))
        if missing:
            fresh = self.text_encoders().encode(missing)
            self.encoder_calls += len(missing)
            if self.cache is not None:
                self.cache.put(missing, fresh)
            else:
                for i, prompt in enumerate(missing):
                    self._memory[prompt] = {k: v[i : i + 1].cpu() for k, v in fresh.items()}
        rows = [self._memory[p] if p in self._memory else self.cache.get([p]) for p in prompts]
        return {k: torch.cat([r[k] for r in rows]).to(self.device) for k in rows[0]}

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """The transformer's prediction v for packed ``latents`` at ``sigma`` (timestep truncated, guidance fixed)."""
        batch, device, dtype = latents.shape[0], latents.device, self.module.dtype
        sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32).expand(batch)
        states = cond["encoder_hidden_states"]
        return self.module(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=states.to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            timestep=truncate_timestep(sigma),
            img_ids=self._img_ids.to(device),
            txt_ids=torch.zeros(states.shape[1], 3, device=device),
            guidance=torch.full((batch,), self.settings.guidance, device=device, dtype=torch.float32),
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> images (B, 3, H, W) in [0, 1], float32: ``vae.decode(z/scaling + shift)/2 + 1/2``."""
        config = self.vae.config
        images = []
        for chunk in latents.split(self.settings.decode_batch_size):
            z = unpack_latents(chunk.float(), *self.grid) / config.scaling_factor + config.shift_factor
            images.append(self.vae.decode(z.to(self.vae.device, self.vae.dtype), return_dict=False)[0].float())
        return (torch.cat(images) / 2 + 0.5).clamp(0.0, 1.0)

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """All transformer weights, or only the LoRA weights when LoRA is on."""
        return [p for p in self.module.parameters() if p.requires_grad]

    # ---- saving

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``transformer/`` (diffusers layout, safetensors) or, with LoRA, ``pytorch_lora_weights.safetensors``
        in diffusers' LoRA format (``FluxPipeline.load_lora_weights(directory)`` reads it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.uses_lora:
            from diffusers import FluxPipeline
            from peft.utils import get_peft_model_state_dict

            FluxPipeline.save_lora_weights(
                directory, transformer_lora_layers=get_peft_model_state_dict(self.module),
                transformer_lora_adapter_metadata=self.module.peft_config["default"].to_dict(),
                safe_serialization=True,
            )
        else:
            self.module.save_pretrained(directory / "transformer", safe_serialization=True)
        return directory


def build_flux_policy(model_cfg: ModelConfig, device: torch.device) -> FluxFlowModel:
    """The trainer's entry: ``FluxFlowModel`` from the run's ``ModelConfig`` (its path, its FLUX settings)."""
    if not getattr(model_cfg, "path", ""):
        raise ValueError("model.kind=flux needs model.path: a diffusers FLUX directory or its s3:// prefix")
    return FluxFlowModel.from_pretrained(model_cfg.path, FluxSettings(**dataclasses.asdict(model_cfg)), device)
