"""Rewards reproduce their reference implementations: preprocessing bit-identical on 8-bit inputs,
prompt tokens as the references clean and cut them, scores within 1e-4 relative.

References (see ``reward_references``): transformers' ``CLIPImageProcessor`` (PIL backend) and
``CLIPTokenizer`` as PickScore's ``CLIPProcessor``; HPSv2's ``ResizeMaxSize`` and torchvision's
``Resize`` / ``CenterCrop`` / ``ToTensor`` / ``Normalize`` rebuilt on PIL; open_clip's
``SimpleTokenizer`` rebuilt on ftfy / html / regex; open_clip's model forward on the raw state dict
(``test_rewards_clip``). Models: tiny random weights saved in the real formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mixgrpo.rewards import build_reward
from mixgrpo.rewards.clip_scorers import HPS_CHECKPOINT, open_clip_clean
from mixgrpo.rewards.preprocess import ImageTransform, plan_geometry, to_uint8
from reward_references import (
    OpenClipTokenizer,
    check_score_errors,
    hps_resize_max_size,
    pil_uint8,
    sample_images,
    save_byte_level_clip_tokenizer,
    to_tensor_normalize,
    torchvision_resize_center_crop,
    torchvision_squash,
    trainer_pil_images,
)
from test_rewards_clip import TINY_OPEN_CLIP, make_hf_clip_dir, make_hps_dir, open_clip_state_dict, ref_encode_image, ref_encode_text

IMAGES = sample_images()
TRICKY_PROMPTS = [
    "“A quote” about the cat",  # curly quotes
    "fish &amp; chips &lt;b&gt; and &amp;amp; the tree",  # HTML entities, one double-escaped
    "a ﬁne ﬁsh ﬂoating",  # ligatures
    "ＡＢＣ　ｔｈｅ　ｄｏｇ １２３",  # full-width letters, digits and space
    "  Red\n\tdog’s   SKY ",  # whitespace runs, upper case, curly apostrophe
    "Café naïve",  # accents kept
]
LONG_PROMPTS = [" ".join(["the cat and the red dog"] * 20), "“" + " ".join(["ﬁsh &amp; tree"] * 40) + "”"]
PROMPTS = TRICKY_PROMPTS + LONG_PROMPTS


def processor_pil(**kwargs):
    """transformers' CLIP image processor on its PIL backend (the one PickScore's CLIPProcessor ran)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers < 5: the PIL processor is CLIPImageProcessor itself
        from transformers import CLIPImageProcessor as Processor
    return Processor(**kwargs)


def processor_uint8(processor, images: torch.Tensor) -> torch.Tensor:
    """The processor's resized / cropped 8-bit pixels (rescale and normalise switched off)."""
    out = processor(images=trainer_pil_images(images), do_rescale=False, do_normalize=False, return_tensors="pt")
    return out["pixel_values"].round().to(torch.uint8)


# --------------------------------------------------------------------------- 8 bits, crop and resampling


def test_to_uint8_rounds_like_the_trainers_numpy_to_pil() -> None:
    x = torch.cat([torch.rand(1, 3, 16, 16), (torch.arange(256.0) / 255).view(1, 1, 16, 16).expand(1, 3, 16, 16),
                   ((torch.arange(256.0) + 0.5) / 255).view(1, 1, 16, 16).expand(1, 3, 16, 16)])
    assert torch.equal(to_uint8(x), pil_uint8(trainer_pil_images(x)))


@pytest.mark.parametrize("excess", range(8))
def test_crop_offset_matches_clip_image_processor(excess: int) -> None:
    size = 20
    processor = processor_pil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ours = ImageTransform(size=size, mode="crop", crop="floor")
    for h, w in ((size, size + excess), (size + excess, size)):  # no resize: only the crop moves the pixels
        images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(excess))
        expected = processor_uint8(processor, images)
        assert torch.equal(ours.resize_uint8(to_uint8(images)), expected)
        assert plan_geometry(h, w, size, "crop", "floor").offset == ((h - size) // 2, (w - size) // 2)
    # torchvision's rule (ImageReward, open_clip) starts one pixel later exactly when excess % 4 == 3
    rounded = ImageTransform(size=size, mode="crop", crop="round").resize_uint8(to_uint8(images))
    assert torch.equal(rounded, expected) == (excess % 4 != 3)


@pytest.mark.parametrize("excess", range(8))
def test_round_crop_matches_torchvision_center_crop(excess: int) -> None:
    size = 20
    images = torch.rand(1, 3, size + excess, size + 2 * excess, generator=torch.Generator().manual_seed(excess))
    ours = ImageTransform(size=size, mode="crop", crop="round").resize_uint8(to_uint8(images))
    expected = pil_uint8([torchvision_resize_center_crop(im, size) for im in trainer_pil_images(images)])
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_resampled_pixels_equal_pil_and_the_references(name: str) -> None:
    images, size = IMAGES[name], 28
    pil = trainer_pil_images(images)
    cases = {
        "crop floor (transformers)": (ImageTransform(size=size, mode="crop", crop="floor"),
                                      processor_uint8(processor_pil(size={"shortest_edge": size},
                                                                    crop_size={"height": size, "width": size}), images)),
        "squash (transformers)": (ImageTransform(size=size, mode="squash"),
                                  processor_uint8(processor_pil(size={"height": size, "width": size},
                                                                do_center_crop=False), images)),
        "crop round (torchvision)": (ImageTransform(size=size, mode="crop", crop="round"),
                                     pil_uint8([torchvision_resize_center_crop(im, size) for im in pil])),
        "squash (torchvision)": (ImageTransform(size=size, mode="squash"), pil_uint8([torchvision_squash(im, size) for im in pil])),
        "pad (HPSv2)": (ImageTransform(size=size, mode="pad"), pil_uint8([hps_resize_max_size(im, size) for im in pil])),
    }
    for case, (transform, expected) in cases.items():
        assert torch.equal(transform.resize_uint8(to_uint8(images)), expected), case
        normalised = to_tensor_normalize([Image.fromarray(a) for a in expected.permute(0, 2, 3, 1).numpy()])
        assert torch.equal(transform(images), normalised), case  # ToTensor + Normalize: same float32 arithmetic


def test_normalised_pixels_match_the_clip_image_processor() -> None:
    images = torch.cat([IMAGES["noise-wide"][..., :40, :120], IMAGES["smooth-wide"][..., :40, :120]])
    expected = processor_pil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})(
        images=trainer_pil_images(images), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ImageTransform(size=28, mode="crop")(images), expected, atol=2e-6, rtol=0)


def test_pad_mode_pads_an_image_already_at_the_size_where_hpsv2_would_not() -> None:
    # HPSv2's ResizeMaxSize skips its padding when the longest side is already 224 and then fails on
    # the non-square tensor; we pad (documented deviation): 224 x 160 -> 32 black columns each side.
    images = torch.rand(1, 3, 224, 160, generator=torch.Generator().manual_seed(0))
    out = ImageTransform(size=224, mode="pad").resize_uint8(to_uint8(images))
    assert out.shape == (1, 3, 224, 224)
    assert torch.equal(out[..., 32:192], to_uint8(images)) and out[..., :32].eq(0).all() and out[..., 192:].eq(0).all()


def test_torch_resample_is_an_approximation_of_pil() -> None:
    images = IMAGES["smooth-large"]
    exact = ImageTransform(size=28, mode="crop").resize_uint8(to_uint8(images)).int()
    approx = ImageTransform(size=28, mode="crop", resample="torch").resize_uint8(to_uint8(images)).int()
    assert approx.dtype == exact.dtype and approx.shape == exact.shape
    assert 0 < (approx - exact).abs().max() <= 3  # a few grey levels on a smooth image, never exact
    with pytest.raises(ValueError, match="resample must be"):
        ImageTransform(size=28, resample="cv2")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(("prompt", "cleaned"), [
    ("“A quote” about the cat", '"a quote" about the cat'),
    ("fish &amp; chips &lt;b&gt;", "fish & chips <b>"),
    ("&amp;amp; twice", "& twice"),
    ("a ﬁne ﬂower", "a fine flower"),
    ("ＡＢＣ　１２３", "abc 123"),
    ("  Red\n\tdog’s   SKY ", "red dog's sky"),
    ("Café", "café"),
])
def test_open_clip_clean(prompt: str, cleaned: str) -> None:
    assert open_clip_clean(prompt) == cleaned


@pytest.fixture(scope="module")
def byte_level_hps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HPS dir with a tokenizer that covers every byte and a 77-token context (as the real one)."""
    config = json.loads(json.dumps(TINY_OPEN_CLIP))
    root = tmp_path_factory.mktemp("hps")
    config["model_cfg"]["text_cfg"] |= {"context_length": 77, "vocab_size": save_byte_level_clip_tokenizer(root)}
    return make_hps_dir(root, seed=5, config=config, save_tokenizer=lambda d: None)


def test_hps_prompt_tokens_follow_open_clip(byte_level_hps: Path) -> None:
    reward = build_reward("hps", weights_dir=byte_level_hps)
    reference = OpenClipTokenizer(byte_level_hps)(PROMPTS, 77)
    ours = reward.tokenize(PROMPTS)["input_ids"]
    uncleaned = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    for row in range(len(PROMPTS)):
        end = int((reference[row] == reference[row].max()).nonzero()[0]) + 1  # eot has the highest id
        assert torch.equal(ours[row, :end], reference[row, :end]), PROMPTS[row]
        # after the end token open_clip pads with 0, transformers with eot: the causal text tower never looks there
        assert ours[row, end:].eq(reward.tokenizer.pad_token_id).all()
    changed = [not torch.equal(ours[r], uncleaned[r]) for r in range(len(TRICKY_PROMPTS))]
    assert changed == [True] * 5 + [False]  # cleaning changes each tricky prompt but the accented one
    assert reference[len(TRICKY_PROMPTS):, -1].eq(reference.max()).all()  # the long prompts really are cut


def test_pickscore_prompts_are_tokenized_as_clip_processor_does(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    root = make_hf_clip_dir(tmp_path / "pick", save_tokenizer=save_byte_level_clip_tokenizer)
    reward = build_reward("pickscore", weights_dir=root)
    expected = CLIPTokenizer.from_pretrained(str(root))(PROMPTS, padding="max_length", truncation=True, max_length=77,
                                                       return_tensors="pt")["input_ids"]
    assert torch.equal(reward.tokenize(PROMPTS)["input_ids"], expected)


# --------------------------------------------------------------------------- scores


def score_batch() -> tuple[list[torch.Tensor], list[str]]:
    """Every sample image (separately: they differ in size) with a prompt each, cycling through PROMPTS."""
    names = sorted(IMAGES)
    return [IMAGES[n] for n in names], [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]


def scores_hps(root: Path, resample: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, reference) HPS scores over :func:`score_batch`; reference: HPSv2's preprocessing, open_clip's tokens and forward."""
    reward = build_reward("hps", weights_dir=root, resample=resample)
    sd = {k: v.float() for k, v in torch.load(root / HPS_CHECKPOINT)["state_dict"].items()}
    images, prompts = score_batch()
    ours = torch.cat([reward(im, [p]) for im, p in zip(images, prompts)])
    with torch.no_grad():
        pixels = torch.cat([to_tensor_normalize([hps_resize_max_size(trainer_pil_images(im)[0], 28)]) for im in images])
        i = F.normalize(ref_encode_image(sd, pixels), dim=-1)
        t = F.normalize(ref_encode_text(sd, OpenClipTokenizer(root)(prompts, 77)), dim=-1)
    return ours, (i * t).sum(-1)


def make_open_clip_dir(root: Path, resize_mode: str) -> Path:
    """A DFN5B-style open_clip dir: ``open_clip_config.json`` (with ``preprocess_cfg``), ``open_clip_pytorch_model.bin``."""
    config = json.loads(json.dumps(TINY_OPEN_CLIP)) | {"preprocess_cfg": {"resize_mode": resize_mode}}
    config["model_cfg"]["text_cfg"] |= {"context_length": 77, "vocab_size": save_byte_level_clip_tokenizer(root)}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(open_clip_state_dict(7, config), root / "open_clip_pytorch_model.bin")
    return root


def scores_clip(root: Path, resample: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, reference) CLIP scores; reference: open_clip's torchvision transform on PIL, its tokens and forward."""
    reward = build_reward("clip", weights_dir=root, resample=resample)
    sd = torch.load(root / "open_clip_pytorch_model.bin")
    mode = json.loads((root / "open_clip_config.json").read_text())["preprocess_cfg"]["resize_mode"]
    resize = torchvision_resize_center_crop if mode == "shortest" else torchvision_squash
    images, prompts = score_batch()
    ours = torch.cat([reward(im, [p]) for im, p in zip(images, prompts)])
    with torch.no_grad():
        pixels = torch.cat([to_tensor_normalize([resize(trainer_pil_images(im)[0], 28)]) for im in images])
        i = F.normalize(ref_encode_image(sd, pixels), dim=-1)
        t = F.normalize(ref_encode_text(sd, OpenClipTokenizer(root)(prompts, 77)), dim=-1)
    return ours, (i * t).sum(-1)


def scores_pickscore(root: Path, resample: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, reference) raw PickScores; reference: PickScore's published recipe (CLIPProcessor inputs,
    normalised embeddings, ``exp(logit_scale) * t . i``)."""
    from transformers import CLIPModel, CLIPTokenizer

    reward = build_reward("pickscore", weights_dir=root, normalize="raw", resample=resample)
    model = CLIPModel.from_pretrained(str(root)).eval()
    processor = processor_pil(**json.loads((root / "preprocessor_config.json").read_text()))
    tokenizer = CLIPTokenizer.from_pretrained(str(root))
    images, prompts = score_batch()
    images.append(torch.rand(1, 3, 56, 62, generator=torch.Generator().manual_seed(3)))  # resized to 28 x 31: excess 3
    prompts.append(PROMPTS[0])
    ours = torch.cat([reward(im, [p]) for im, p in zip(images, prompts)])
    reference = []
    with torch.no_grad():
        for im, prompt in zip(images, prompts):
            pixels = processor(images=trainer_pil_images(im), return_tensors="pt")["pixel_values"]
            text = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
            i = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
            t = F.normalize(_features(model.get_text_features(**text)), dim=-1)
            reference.append(model.logit_scale.exp() * (t @ i.T)[0])
    return ours, torch.cat(reference)


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory: pytest.TempPathFactory, byte_level_hps: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rewards")
    return {
        "hps": byte_level_hps,
        "clip-shortest": make_open_clip_dir(root / "dfn-shortest", "shortest"),
        "clip-squash": make_open_clip_dir(root / "dfn-squash", "squash"),
        "pickscore": make_hf_clip_dir(root / "pick", save_tokenizer=save_byte_level_clip_tokenizer),
    }


SCORERS = {"hps": scores_hps, "clip-shortest": scores_clip, "clip-squash": scores_clip, "pickscore": scores_pickscore}


@pytest.mark.parametrize("reward", sorted(SCORERS))
@pytest.mark.parametrize("resample", ["pil", "torch"])
def test_scores_equal_the_reference(reward_dirs: dict[str, Path], reward: str, resample: str) -> None:
    """Default (``pil``): within 1e-4 relative of the reference. ``torch``: the measured error of the opt-in path."""
    ours, reference = SCORERS[reward](reward_dirs[reward], resample)
    check_score_errors(reward, resample, ours, reference)
