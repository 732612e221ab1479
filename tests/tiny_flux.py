"""A tiny random FLUX.1 pipeline built in code and saved in diffusers layout (no hub access).

Same classes and on-disk layout as black-forest-labs/FLUX.1-dev (model_index.json, transformer/,
vae/, text_encoder/ + tokenizer/ (CLIP), text_encoder_2/ + tokenizer_2/ (T5), scheduler/), with
widths of 16-32 so that a forward pass takes milliseconds on a CPU:

- transformer: 1 double + 1 single block, 2 heads x 16, 64 input channels (16 latent channels packed 2x2);
- VAE: 16 latent channels, 4 blocks (8x down-sampling like the real one), scaling 0.3611 / shift 0.1159;
- CLIP: 2 layers of width 32 over a character-level BPE vocabulary (no merges), 77 positions;
- T5: 2 layers of width 32 over a character-level Unigram vocabulary;
- scheduler: FlowMatchEulerDiscreteScheduler with a static shift of 3 (no resolution-dependent shift),
  so that ``FluxPipeline`` steps the same schedule as ``mixgrpo.sampling.flow_sigmas``.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

TEXT_DIM = 32  # T5 d_model = the transformer's joint_attention_dim
POOLED_DIM = 32  # CLIP hidden size = the transformer's pooled_projection_dim
LATENT_CHANNELS = 16
CHARS = string.ascii_lowercase + string.digits + ",.'!?-"


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP BPE: every character, plus its end-of-word form ``c</w>``; no merges."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    pieces = [*CHARS, *(c + "</w>" for c in CHARS)]
    vocab = {token: i for i, token in enumerate(specials + pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """Character-level T5 Unigram vocabulary (pad 0, eos 1, unk 2 as in T5), no sentinel tokens."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -3.5) for c in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_text_model(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=POOLED_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=POOLED_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def vae() -> AutoencoderKL:
    """FLUX-like VAE: 16 latent channels, 8x down-sampling, no quant convs, FLUX's scaling and shift."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A randomly initialised tiny ``FluxPipeline`` (deterministic for a given seed)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=vae(),
        text_encoder=clip_text_model(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=transformer(),
    )


def save_tiny_flux(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it (safetensors, diffusers layout)."""
    directory = Path(directory)
    build_tiny_flux_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    return directory
