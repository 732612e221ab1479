"""HPS v2.1, PickScore and CLIP score on tiny random-weight models saved in the real on-disk formats.

The open_clip -> CLIPModel converter is checked against an open_clip-style forward written here
from the state dict alone (torch's multi-head attention on the fused in_proj weights, LND layout,
argmax pooling, ``x @ proj``), so a wrong split, transpose or key would show as a different score.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixgrpo.rewards import build_reward
from mixgrpo.rewards.clip_scorers import (
    HPS_CHECKPOINT,
    VIT_H_14,
    OpenClipArch,
    convert_open_clip_state_dict,
)
from mixgrpo.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform, transform_from_processor_config

# A tiny open_clip ViT CLIP: vision 64 wide (2 heads of 32), text 64 wide (2 heads), 2 layers each.
TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
        "text_cfg": {"context_length": 12, "vocab_size": 54, "width": 64, "heads": 2, "layers": 2},
    }
}
PROMPTS = ["a red cat", "a blue dog on grass", "sky", "an old tree near the river bank today"]


# --------------------------------------------------------------------------- tiny files


def tiny_clip_vocab() -> dict[str, int]:
    """Letters, letters ending a word, then start / end of text; end of text has the highest id (as in CLIP)."""
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab["<|startoftext|>"] = 52
    vocab["<|endoftext|>"] = 53
    return vocab


def save_clip_tokenizer(directory: Path) -> None:
    from transformers import CLIPTokenizer

    CLIPTokenizer(vocab=tiny_clip_vocab(), merges=[]).save_pretrained(str(directory))
    (directory / "vocab.json").write_text(json.dumps(tiny_clip_vocab()))  # as the real files: sot / eot ids inside


def open_clip_state_dict(seed: int = 0, config: dict = TINY_OPEN_CLIP) -> dict[str, torch.Tensor]:
    """Random tensors under open_clip's own names and shapes (written from open_clip's model.py)."""
    g = torch.Generator().manual_seed(seed)
    cfg = config["model_cfg"]
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]

    def rnd(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def blocks(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
        sd = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            sd |= {
                p + "ln_1.weight": 1 + rnd(width), p + "ln_1.bias": rnd(width),
                p + "attn.in_proj_weight": rnd(3 * width, width, std=0.2), p + "attn.in_proj_bias": rnd(3 * width),
                p + "attn.out_proj.weight": rnd(width, width, std=0.2), p + "attn.out_proj.bias": rnd(width),
                p + "ln_2.weight": 1 + rnd(width), p + "ln_2.bias": rnd(width),
                p + "mlp.c_fc.weight": rnd(4 * width, width, std=0.2), p + "mlp.c_fc.bias": rnd(4 * width),
                p + "mlp.c_proj.weight": rnd(width, 4 * width, std=0.2), p + "mlp.c_proj.bias": rnd(width),
            }
        return sd

    grid = v["image_size"] // v["patch_size"]
    sd = {
        "positional_embedding": rnd(t["context_length"], t["width"]),
        "text_projection": rnd(t["width"], e, std=0.2),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "token_embedding.weight": rnd(t["vocab_size"], t["width"], std=0.5),
        "ln_final.weight": 1 + rnd(t["width"]), "ln_final.bias": rnd(t["width"]),
        "visual.class_embedding": rnd(v["width"]),
        "visual.positional_embedding": rnd(grid * grid + 1, v["width"]),
        "visual.proj": rnd(v["width"], e, std=0.2),
        "visual.conv1.weight": rnd(v["width"], 3, v["patch_size"], v["patch_size"], std=0.05),
        "visual.ln_pre.weight": 1 + rnd(v["width"]), "visual.ln_pre.bias": rnd(v["width"]),
        "visual.ln_post.weight": 1 + rnd(v["width"]), "visual.ln_post.bias": rnd(v["width"]),
    }
    return sd | blocks("", t["width"], t["layers"]) | blocks("visual.", v["width"], v["layers"])


def make_hps_dir(directory: Path, seed: int = 0, config: dict = TINY_OPEN_CLIP, save_tokenizer=save_clip_tokenizer) -> Path:
    """HPS layout: the checkpoint as HPSv2 saves it ({'state_dict': ...}, fp16), a tokenizer, the arch config."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.half() for k, v in open_clip_state_dict(seed, config).items()}
    torch.save({"epoch": 1, "state_dict": sd}, directory / HPS_CHECKPOINT)
    save_tokenizer(directory)
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return directory


def make_hf_clip_dir(
    directory: Path, seed: int = 0, image_size: int = 28, processor: dict | None = None, save_tokenizer=save_clip_tokenizer,
) -> Path:
    """A Hugging Face CLIPModel directory (PickScore_v1 / DFN5B layout): config, safetensors, tokenizer, processor."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    save_tokenizer(directory)
    vocab = json.loads((directory / "vocab.json").read_text())
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=14, hidden_act="gelu"),
        projection_dim=16,
    )
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(directory))
    processor = processor or {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
        "size": {"shortest_edge": image_size}, "image_processor_type": "CLIPImageProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def images_batch(n: int = 4, h: int = 40, w: int = 56, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- an open_clip-style reference


def _ref_block(sd: dict, p: str, x: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
    attn, _ = F.multi_head_attention_forward(
        h, h, h, width, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask,
    )
    x = x + attn
    h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
    return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def ref_encode_text(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text``: zero padding after the end token, causal mask, argmax pooling."""
    cfg = TINY_OPEN_CLIP["model_cfg"]["text_cfg"]
    length = tokens.shape[1]
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for i in range(cfg["layers"]):
        x = _ref_block(sd, f"transformer.resblocks.{i}.", x, cfg["heads"], mask)
    x = F.layer_norm(x.permute(1, 0, 2), (cfg["width"],), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ sd["text_projection"]


def ref_encode_image(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer.forward``: conv patches, class token, ln_pre, blocks, ln_post(x[:, 0]) @ proj."""
    cfg = TINY_OPEN_CLIP["model_cfg"]["vision_cfg"]
    width, heads = cfg["width"], cfg["width"] // cfg["head_width"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=cfg["patch_size"]).flatten(2).permute(0, 2, 1)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5).permute(1, 0, 2)
    for i in range(cfg["layers"]):
        x = _ref_block(sd, f"visual.transformer.resblocks.{i}.", x, heads, None)
    pooled = F.layer_norm(x.permute(1, 0, 2)[:, 0], (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return pooled @ sd["visual.proj"]


def open_clip_tokens(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    """open_clip's tokenizer output: [sot, ..., eot, 0, 0, ...] (zeros after the end token)."""
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    first_eot = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    keep = torch.arange(length)[None] <= first_eot[:, None]
    return torch.where(keep, ids, torch.zeros_like(ids))


# --------------------------------------------------------------------------- preprocessing


def test_pad_mode_puts_a_wide_image_in_the_middle_band_with_black_padding() -> None:
    # a 100 wide x 50 high white image -> 224 x 112, centred vertically in 224 x 224
    images = torch.ones(1, 3, 50, 100)
    out = ImageTransform(size=224, mode="pad")(images)
    assert out.shape == (1, 3, 224, 224)
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)
    black = torch.tensor([(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)
    torch.testing.assert_close(out[0, :, 56:168, :], white.expand(3, 112, 224), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, :, :56, :], black.expand(3, 56, 224), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, :, 168:, :], black.expand(3, 56, 224), atol=1e-6, rtol=0)


def test_pad_mode_odd_padding_goes_right_and_bottom() -> None:
    images = torch.ones(1, 3, 20, 7)  # tall: 224 high, round(7 * 11.2) = 78 wide, pad 146 = 73 + 73
    out = ImageTransform(size=224, mode="pad", mean=(0, 0, 0), std=(1, 1, 1))(images)
    cols = (out[0, 0] > 0.5).any(dim=0).nonzero().flatten()
    assert (cols.min().item(), cols.max().item()) == (73, 150)
    images = torch.ones(1, 3, 10, 7)  # 224 x round(156.8) = 157 wide, pad 67 = 33 left + 34 right
    out = ImageTransform(size=224, mode="pad", mean=(0, 0, 0), std=(1, 1, 1))(images)
    cols = (out[0, 0] > 0.5).any(dim=0).nonzero().flatten()
    assert (cols.min().item(), cols.max().item()) == (33, 189)


def test_crop_mode_matches_the_hf_clip_image_processor() -> None:
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(1)
    array = (rng.random((50, 100, 3)) * 255).astype(np.uint8)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    expected = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    images = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    out = ImageTransform(size=28, mode="crop")(images)
    assert out.shape == expected.shape == (1, 3, 28, 28)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)  # same 8-bit pixels; float rounding only


def test_crop_mode_takes_the_centre() -> None:
    images = torch.zeros(1, 3, 224, 300)
    images[..., 38:262] = 1.0  # the centre 224 columns are white: round((300 - 224) / 2) = 38
    out = ImageTransform(size=224, mode="crop", mean=(0, 0, 0), std=(1, 1, 1))(images)
    assert torch.equal(out, torch.ones(1, 3, 224, 224))


def test_processor_config_squash_and_defaults(tmp_path: Path) -> None:
    assert transform_from_processor_config(tmp_path, 224) == ImageTransform(size=224, mode="crop")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 384, "width": 384}, "do_center_crop": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    t = transform_from_processor_config(tmp_path, 224)
    assert (t.size, t.mode, t.mean, t.std) == (384, "squash", (0.5,) * 3, (0.5,) * 3)


# --------------------------------------------------------------------------- the converter


def test_converter_covers_every_key_of_a_tiny_clip_model() -> None:
    from transformers import CLIPModel

    arch = OpenClipArch.from_config(TINY_OPEN_CLIP)
    converted = convert_open_clip_state_dict(open_clip_state_dict())
    model = CLIPModel(arch.hf_config(bos_token_id=52, eos_token_id=53, pad_token_id=53))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_converter_rejects_keys_it_does_not_know() -> None:
    sd = open_clip_state_dict() | {"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(64)}
    with pytest.raises(ValueError, match="ls_1.gamma"):
        convert_open_clip_state_dict(sd)


def test_vit_h_14_matches_hpsv2s_model_config() -> None:
    doc = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
    assert OpenClipArch.from_config(doc) == VIT_H_14
    vision = VIT_H_14.hf_config(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407).vision_config
    assert (vision.num_attention_heads, vision.intermediate_size, vision.hidden_act) == (16, 5120, "gelu")


def test_hps_equals_an_open_clip_style_forward(tmp_path: Path) -> None:
    root = make_hps_dir(tmp_path / "hps")
    reward = build_reward("hps", weights_dir=str(root), device="cpu", batch_size=3)
    images = images_batch()
    scores = reward(images, PROMPTS)

    sd = {k: v.float() for k, v in torch.load(root / HPS_CHECKPOINT)["state_dict"].items()}
    tokens = open_clip_tokens(reward.tokenizer, PROMPTS, 12)
    assert (tokens == 0).any()  # the reference really sees open_clip's zero padding
    pixels = reward.transform(images)
    with torch.no_grad():
        i = F.normalize(ref_encode_image(sd, pixels), dim=-1)
        t = F.normalize(ref_encode_text(sd, tokens), dim=-1)
    torch.testing.assert_close(scores, (i * t).sum(-1), atol=1e-5, rtol=0)
    assert scores.std() > 1e-3  # the prompts and images really differ


def test_hps_is_deterministic_batch_invariant_and_nan_for_bad_pixels(tmp_path: Path) -> None:
    root = make_hps_dir(tmp_path / "hps")
    images = images_batch()
    a = build_reward("hps", weights_dir=root, batch_size=4)(images, PROMPTS)
    b = build_reward("hps", weights_dir=root, batch_size=1)(images, PROMPTS)
    assert a.shape == (4,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    bad = images.clone()
    bad[2, 0, 3, 3] = float("nan")
    c = build_reward("hps", weights_dir=root, batch_size=4)(bad, PROMPTS)
    assert torch.isnan(c[2]) and torch.isfinite(c[[0, 1, 3]]).all()
    torch.testing.assert_close(c[[0, 1, 3]], a[[0, 1, 3]], atol=1e-6, rtol=0)


def test_hps_with_a_mismatched_config_names_the_fix(tmp_path: Path) -> None:
    root = make_hps_dir(tmp_path / "hps")
    (root / "open_clip_config.json").unlink()  # falls back to ViT-H-14, which these weights are not
    with pytest.raises(ValueError, match="open_clip_config.json"):
        build_reward("hps", weights_dir=root)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    root = make_hps_dir(tmp_path / "hps")
    (root / HPS_CHECKPOINT).unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks HPS_v2.1_compressed.pt"):
        build_reward("hps", weights_dir=root)


# --------------------------------------------------------------------------- PickScore and CLIP score


def test_pickscore_is_logit_scale_times_cosine_with_each_normalisation(tmp_path: Path) -> None:
    from transformers import CLIPModel

    root = make_hf_clip_dir(tmp_path / "pick")
    images = images_batch()
    raw = build_reward("pickscore", weights_dir=root, normalize="raw")(images, PROMPTS)
    train = build_reward("pickscore", weights_dir=root)(images, PROMPTS)
    report = build_reward("pickscore", weights_dir=root, normalize="report")(images, PROMPTS)
    torch.testing.assert_close(train, (raw - 18) / 8)
    torch.testing.assert_close(report, raw / 100)

    model = CLIPModel.from_pretrained(str(root)).eval()  # the library's own forward: logits = scale * cos
    reward = build_reward("pickscore", weights_dir=root, normalize="raw")
    tokens = reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=reward.transform(images)).logits_per_image
    torch.testing.assert_close(raw, logits.diagonal(), atol=1e-4, rtol=0)
    assert raw.std() > 1e-2


def test_pickscore_cuts_text_at_77_tokens(tmp_path: Path) -> None:
    root = make_hf_clip_dir(tmp_path / "pick")
    reward = build_reward("pickscore", weights_dir=root, normalize="raw")
    images = images_batch(2)
    long = " ".join(["ab"] * 60)  # 120 tokens
    a = reward(images, [long, long])
    b = reward(images, [long + " cd cd cd", long + " xy"])  # differences after token 77 are cut
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="normalize must be one of"):
        build_reward("pickscore", weights_dir=root, normalize="paper")


def test_clip_score_is_cosine_at_the_processor_resolution(tmp_path: Path) -> None:
    root = make_hf_clip_dir(tmp_path / "clip", image_size=42, processor={
        "size": {"height": 42, "width": 42}, "do_center_crop": False,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)})
    reward = build_reward("clip", weights_dir=root, batch_size=2)
    assert reward.transform.mode == "squash" and reward.transform.size == 42
    images = images_batch()
    scores = reward(images, PROMPTS)
    assert scores.shape == (4,) and (scores.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(scores, build_reward("clip", weights_dir=root, batch_size=4)(images, PROMPTS), atol=1e-6, rtol=0)
    swapped = reward(images, PROMPTS[::-1])
    assert not torch.allclose(scores, swapped)


def test_clip_score_loads_an_open_clip_directory(tmp_path: Path) -> None:
    root = tmp_path / "dfn"
    root.mkdir()
    torch.save(open_clip_state_dict(3), root / "open_clip_pytorch_model.bin")
    save_clip_tokenizer(root)
    (root / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP | {"preprocess_cfg": {"resize_mode": "squash"}}))
    reward = build_reward("clip", weights_dir=root)
    assert reward.transform.mode == "squash"
    images = images_batch()
    sd = open_clip_state_dict(3)
    with torch.no_grad():
        i = F.normalize(ref_encode_image(sd, reward.transform(images)), dim=-1)
        t = F.normalize(ref_encode_text(sd, open_clip_tokens(reward.tokenizer, PROMPTS, 12)), dim=-1)
    torch.testing.assert_close(reward(images, PROMPTS), (i * t).sum(-1), atol=1e-5, rtol=0)


def test_wrong_shapes_and_counts_are_rejected(tmp_path: Path) -> None:
    reward = build_reward("pickscore", weights_dir=make_hf_clip_dir(tmp_path / "pick"))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.rand(3, 28, 28), ["a"])
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.rand(2, 3, 28, 28), ["a"])


def test_bfloat16_scores_are_close_to_float32(tmp_path: Path) -> None:
    root = make_hps_dir(tmp_path / "hps")
    images = images_batch()
    full = build_reward("hps", weights_dir=root)(images, PROMPTS)
    half = build_reward("hps", weights_dir=root, dtype="bfloat16")(images, PROMPTS)
    assert half.dtype == torch.float32
    assert (full - half).abs().max() < 0.05
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_reward("hps", weights_dir=root, dtype="fp8")
