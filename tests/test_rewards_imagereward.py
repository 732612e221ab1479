"""ImageReward on a tiny random-weight model saved as ``ImageReward.pt`` + ``med_config.json`` + ``vocab.txt``."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from mixgrpo.rewards import build_reward
from mixgrpo.rewards.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    BlipViT,
    BlipViTConfig,
    ImageRewardModel,
    load_image_reward,
    text_config_from_med,
)

TINY_VIT = BlipViTConfig(image_size=32, patch_size=16, width=128, depth=2, heads=2, mlp_hidden=512)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, "cat", "dog", "red", "blue", "tree", "##s"]
PROMPTS = ["a red cat", "blue dogs", "a tree", "red red red tree cat dog"]


def tiny_med_config() -> dict:
    """BLIP's med_config.json with tiny sizes (the real one: 768 wide, 12 layers, 12 heads, vocab 30524)."""
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(WORDS) + 2,
        "encoder_width": 32, "add_cross_attention": True,
    }


def reference_key_names(vit: BlipViTConfig, layers: int) -> set[str]:
    """The state-dict keys of THUDM's ImageReward module tree (BLIP_Pretrain + MLP), spelt out from its source."""
    keys = {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "blip.visual_encoder.patch_embed.proj.weight",
            "blip.visual_encoder.patch_embed.proj.bias", "blip.visual_encoder.norm.weight", "blip.visual_encoder.norm.bias"}
    for i in range(vit.depth):
        p = f"blip.visual_encoder.blocks.{i}."
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {p + m + ".weight", p + m + ".bias"}
    e = "blip.text_encoder."
    keys |= {e + "embeddings.word_embeddings.weight", e + "embeddings.position_embeddings.weight",
             e + "embeddings.LayerNorm.weight", e + "embeddings.LayerNorm.bias", e + "embeddings.position_ids"}
    for i in range(layers):
        p = f"{e}encoder.layer.{i}."
        for att in ("attention", "crossattention"):
            for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys |= {f"{p}{att}.{m}.weight", f"{p}{att}.{m}.bias"}
        for m in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys |= {f"{p}{m}.weight", f"{p}{m}.bias"}
    for m in ("blip.vision_proj", "blip.text_proj", *(f"mlp.layers.{i}" for i in (0, 2, 4, 6, 7))):
        keys |= {m + ".weight", m + ".bias"}
    return keys


def make_imagereward_dir(directory: Path, seed: int = 0) -> Path:
    """The published layout; the checkpoint carries the extra keys the real one has (projections, position_ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    med = tiny_med_config()
    (directory / "med_config.json").write_text(json.dumps(med))
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(seed)
    model = ImageRewardModel(TINY_VIT, text_config_from_med(directory / "med_config.json", TINY_VIT.width))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = model.state_dict()
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"]).expand(1, -1)
    state |= {"blip.vision_proj.weight": torch.randn(256, TINY_VIT.width), "blip.vision_proj.bias": torch.zeros(256),
              "blip.text_proj.weight": torch.randn(256, 32), "blip.text_proj.bias": torch.zeros(256)}
    torch.save(state, directory / "ImageReward.pt")
    return directory


def images_batch(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 48, 40, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagereward_dir(tmp_path_factory.mktemp("imagereward"))


def test_checkpoint_keys_are_the_reference_module_tree(weights: Path) -> None:
    saved = set(torch.load(weights / "ImageReward.pt"))
    assert saved == reference_key_names(TINY_VIT, layers=2)


def test_scores_are_finite_deterministic_and_batch_invariant(weights: Path) -> None:
    images = images_batch()
    a = build_reward("imagereward", weights_dir=weights, batch_size=4)(images, PROMPTS)
    b = build_reward("imagereward", weights_dir=str(weights), batch_size=1)(images, PROMPTS)
    assert a.shape == (4,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a.std() > 1e-3


def test_standard_output_is_raw_minus_mean_over_std(weights: Path) -> None:
    images = images_batch()
    raw = build_reward("imagereward", weights_dir=weights, normalize="raw")(images, PROMPTS)
    standard = build_reward("imagereward", weights_dir=weights)(images, PROMPTS)
    torch.testing.assert_close(standard, (raw - REWARD_MEAN) / REWARD_STD)


def test_the_text_cross_attends_to_the_image(weights: Path) -> None:
    reward = build_reward("imagereward", weights_dir=weights)
    images = images_batch()
    base = reward(images, PROMPTS)
    other_images = reward(images.flip(0), PROMPTS)
    other_prompts = reward(images, PROMPTS[::-1])
    assert (base - other_images).abs().max() > 1e-4
    assert (base - other_prompts).abs().max() > 1e-4


def test_text_is_cut_at_35_tokens(weights: Path) -> None:
    reward = build_reward("imagereward", weights_dir=weights)
    images = images_batch(2)
    long = " ".join(["cat"] * 40)
    torch.testing.assert_close(reward(images, [long, long]), reward(images, [long + " dog", long + " tree"]))
    shorter = " ".join(["cat"] * 30)
    assert not torch.allclose(reward(images, [shorter, shorter]), reward(images, [shorter + " dog", shorter + " tree"]))


def test_image_is_resized_and_centre_cropped_to_the_vit_size(weights: Path) -> None:
    reward = build_reward("imagereward", weights_dir=weights)
    assert (reward.transform.size, reward.transform.mode) == (32, "crop")
    big = torch.nn.functional.interpolate(images_batch(), scale_factor=3, mode="nearest")
    torch.testing.assert_close(reward(images_batch(), PROMPTS), reward(big, PROMPTS), atol=0.05, rtol=0)


def test_a_non_finite_image_scores_nan_alone(weights: Path) -> None:
    reward = build_reward("imagereward", weights_dir=weights)
    images = images_batch()
    bad = images.clone()
    bad[1] = float("inf")
    out = reward(bad, PROMPTS)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
    torch.testing.assert_close(out[[0, 2, 3]], reward(images, PROMPTS)[[0, 2, 3]], atol=1e-5, rtol=0)


def test_blip_vit_equals_transformers_blip_vision_model() -> None:
    """An independent ViT implementation (transformers' BLIP vision tower) on the same weights."""
    from transformers import BlipVisionConfig, BlipVisionModel

    torch.manual_seed(0)
    ours = BlipViT(TINY_VIT).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg = BlipVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
    theirs = BlipVisionModel(cfg).eval()
    rename = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias", "norm.weight": "post_layernorm.weight",
              "norm.bias": "post_layernorm.bias"}
    parts = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    mapped = {}
    for key, value in ours.state_dict().items():
        if key in rename:
            mapped[rename[key]] = value
        else:
            _, i, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            mapped[f"encoder.layers.{i}.{parts[module]}.{kind}"] = value
    theirs.load_state_dict(mapped, strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), theirs(pixel_values=pixels).last_hidden_state, atol=1e-5, rtol=0)


def test_an_unexpected_key_or_a_bad_med_config_is_a_clear_error(tmp_path: Path) -> None:
    root = make_imagereward_dir(tmp_path / "ir")
    state = torch.load(root / "ImageReward.pt")
    torch.save(state | {"blip.itm_head.weight": torch.zeros(2, 32)}, root / "ImageReward.pt")
    with pytest.raises(ValueError, match="itm_head"):
        build_reward("imagereward", weights_dir=root)
    torch.save(state, root / "ImageReward.pt")
    med = tiny_med_config() | {"add_cross_attention": False}
    (root / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(ValueError, match="add_cross_attention"):
        build_reward("imagereward", weights_dir=root)
    (root / "med_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks med_config.json"):
        build_reward("imagereward", weights_dir=root)


@pytest.mark.parametrize("resample", ["pil", "torch"])
def test_scores_equal_the_reference_preprocessing_on_8_bit_images(weights: Path, resample: str) -> None:
    """ImageReward's own recipe: the 8-bit PIL image, torchvision ``Resize(224, BICUBIC)`` + ``CenterCrop(224)``
    + ``ToTensor`` + ``Normalize`` (at this model's 32), BLIP's BERT tokenizer cut at 35 tokens, then the model.
    Default (``pil``): within 1e-4 relative; ``torch``: the measured error of the opt-in on-device resize."""
    from transformers import BertTokenizer

    from reward_references import (
        check_score_errors, sample_images, to_tensor_normalize, torchvision_resize_center_crop, trainer_pil_images,
    )

    reward = build_reward("imagereward", weights_dir=weights, normalize="raw", resample=resample)
    model = load_image_reward(weights)
    tokenizer = BertTokenizer.from_pretrained(str(weights))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    prompts = [*PROMPTS, " ".join(["red cat"] * 30)]  # the last one is cut at 35 tokens
    images = sample_images()
    names = sorted(images)
    ours = torch.cat([reward(images[n], [prompts[i % len(prompts)]]) for i, n in enumerate(names)])
    reference = []
    with torch.no_grad():
        for i, name in enumerate(names):
            pixels = to_tensor_normalize([torchvision_resize_center_crop(trainer_pil_images(images[name])[0], 32)])
            text = tokenizer([prompts[i % len(prompts)]], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            reference.append(model(pixels, text["input_ids"], text["attention_mask"]))
    reference = torch.cat(reference)
    check_score_errors("imagereward", resample, ours, reference)
