"""The toy flow model (tokenizer, text encoder, FLUX transformer adapter), its files, and pre-training."""

import json

import pytest
import torch

from mixgrpo.models.base import FlowModel
from mixgrpo.toy.model import (
    ToyFlowModel,
    ToyModelConfig,
    default_vocabulary,
    image_ids,
    load_toy_model,
    pack,
    save_toy_model,
    truncate_timestep,
    unpack,
)
from mixgrpo.toy.pretrain import (SHIPPED_BASE, SHIPPED_BASES, PretrainConfig, config_key, ensure_base_model, shipped_base_for,
                                  shipped_base_key, train_base_model)

TINY = ToyModelConfig(num_layers=1, num_single_layers=1, num_attention_heads=1, attention_head_dim=16,
                      text_dim=8, axes_dims_rope=(4, 6, 6))
PROMPTS = ["a red circle on a blue background", "a blue circle on a red background"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyFlowModel(TINY)


def test_tokenizer_pads_to_eight_tokens_and_marks_object_and_background_words(model):
    tokens = model.tokenizer(PROMPTS)
    assert tokens.ids.shape == tokens.roles.shape == (2, 8)
    assert tokens.roles[0].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
    assert tokens.ids[0, 7] == 0


@pytest.mark.parametrize("prompt,message", [("a purple circle on a blue background", "not in the toy vocabulary"),
                                            ("a a a a red circle on a blue background", "at most 8")])
def test_tokenizer_rejects_unknown_words_and_long_prompts(model, prompt, message):
    with pytest.raises(ValueError, match=message):
        model.tokenizer([prompt])


def test_pooled_vector_tells_object_and_background_colours_apart(model):
    cond = model.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 8, TINY.text_dim)
    assert cond["pooled_projections"].shape == (2, 2 * TINY.text_dim)
    assert not torch.allclose(cond["pooled_projections"][0], cond["pooled_projections"][1], atol=1e-3)
    # the same words: a plain mean of word embeddings would not see the swap
    words = model.text_encoder.token_embedding(model.tokenizer(PROMPTS).ids[:, :7]).mean(1)
    assert torch.allclose(words[0], words[1], atol=1e-6)


def test_pack_matches_pixel_unshuffle_and_unpack_inverts_it():
    images = torch.rand(2, 3, 32, 32)
    independent = torch.nn.functional.pixel_unshuffle(images, 4).flatten(2).transpose(1, 2)
    assert torch.equal(pack(images), independent)
    assert torch.equal(unpack(pack(images)), images)


def test_image_ids_are_fluxs_row_column_grid():
    from diffusers import FluxPipeline

    expected = FluxPipeline._prepare_latent_image_ids(1, 8, 8, torch.device("cpu"), torch.float32)
    assert torch.equal(image_ids(), expected)


def test_model_implements_flow_model_with_fluxs_transformer(model):
    from diffusers import FluxTransformer2DModel

    assert isinstance(model, FlowModel)
    assert isinstance(model.module, FluxTransformer2DModel)
    assert model.module.config.guidance_embeds
    assert model.latent_shape() == (64, 48)
    assert list(model.trainable_parameters()) == list(model.module.parameters())


def test_velocity_is_the_x0_prediction_converted(model):
    x = torch.randn(2, 64, 48)
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        for sigma in (0.7, 0.3):
            v = model.velocity(x, torch.tensor(sigma), cond)
            assert v.shape == x.shape
            assert torch.allclose(x - sigma * v, model.predict_x0(x, sigma, cond), atol=1e-5)
        # below 0.05 the divisor is clamped
        v = model.velocity(x, 0.01, cond)
        assert torch.allclose(v, (x - model.predict_x0(x, 0.01, cond)) / 0.05, atol=1e-5)


def test_velocity_takes_one_sigma_per_row(model):
    x = torch.randn(2, 64, 48)
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        both = model.velocity(x, torch.tensor([0.9, 0.2]), cond)
        first = model.velocity(x[:1], 0.9, {k: v[:1] for k, v in cond.items()})
        second = model.velocity(x[1:], 0.2, {k: v[1:] for k, v in cond.items()})
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)


def test_timestep_is_sigma_truncated_to_a_thousandth(model):
    sigmas = torch.tensor([1.0, 0.98637, 0.2069, 0.0])
    assert torch.equal(truncate_timestep(sigmas), torch.tensor([1.0, 0.986, 0.206, 0.0]))
    x = torch.randn(1, 64, 48)
    cond = model.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        assert torch.equal(model.predict_x0(x, 0.5861, cond), model.predict_x0(x, 0.5869, cond))
        assert not torch.equal(model.predict_x0(x, 0.5861, cond), model.predict_x0(x, 0.5871, cond))


def test_decode_maps_latents_to_images_in_unit_range(model):
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.decode(model.encode_images(images)), images, atol=1e-6)
    decoded = model.decode(3 * torch.randn(2, 64, 48))
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1


def test_save_and_load_give_identical_outputs(model, tmp_path):
    save_toy_model(model, tmp_path / "toy")
    assert (tmp_path / "toy" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "toy" / "text_encoder" / "model.safetensors").is_file()
    loaded = load_toy_model(tmp_path / "toy")
    assert loaded.config == TINY and loaded.tokenizer.vocabulary == default_vocabulary()
    x = torch.randn(2, 64, 48)
    with torch.no_grad():
        expected = model.velocity(x, 0.6, model.encode_prompts(PROMPTS))
        actual = loaded.velocity(x, 0.6, loaded.encode_prompts(PROMPTS))
    assert torch.equal(expected, actual)


def test_load_names_the_fix_for_a_wrong_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_toy_model"):
        load_toy_model(tmp_path)


def test_config_rejects_rope_axes_that_do_not_fill_a_head():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        ToyModelConfig(attention_head_dim=32, axes_dims_rope=(8, 8, 8))
    with pytest.raises(ValueError, match="unknown ToyModelConfig keys"):
        ToyModelConfig.from_dict({"num_layer": 2})


SHORT = PretrainConfig(model=TINY, steps=40, batch_size=8, warmup_steps=5, learning_rate=3e-3)


def test_short_pretrain_is_deterministic_and_reduces_the_loss():
    first, losses = train_base_model(SHORT, seed=0, progress=False)
    again, losses_again = train_base_model(SHORT, seed=0, progress=False)
    other, _ = train_base_model(SHORT, seed=1, progress=False)
    assert losses == losses_again
    weights = first.module.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in again.module.state_dict().items())
    assert any(not torch.equal(weights[k], v) for k, v in other.module.state_dict().items())
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_ensure_base_model_trains_once_per_config(tmp_path):
    config = PretrainConfig(model=TINY, steps=2, batch_size=2, warmup_steps=1)
    path = ensure_base_model(tmp_path, config=config, progress=False)
    assert (path / "toy_model.json").is_file() and (path / "pretrain.json").is_file()
    stamp = (path / "pretrain.json").stat().st_mtime_ns
    assert ensure_base_model(tmp_path, config=config, progress=False) == path
    assert (path / "pretrain.json").stat().st_mtime_ns == stamp
    changed = ensure_base_model(tmp_path, config=PretrainConfig(model=TINY, steps=3, batch_size=2, warmup_steps=1),
                                progress=False)
    assert changed != path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, changed.name])  # no staging left
    assert isinstance(load_toy_model(changed), ToyFlowModel)


def test_ensure_base_model_defaults_to_the_cache_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path))
    path = ensure_base_model(config=PretrainConfig(model=TINY, steps=1, batch_size=2, warmup_steps=1), progress=False)
    assert path.parent == tmp_path


def test_ensure_base_model_force_retrains_in_place(tmp_path):
    config = PretrainConfig(model=TINY, steps=1, batch_size=2, warmup_steps=1)
    path = ensure_base_model(tmp_path, config=config, progress=False)
    stamp = (path / "pretrain.json").stat().st_mtime_ns
    assert ensure_base_model(tmp_path, config=config, force=True, progress=False) == path
    assert (path / "pretrain.json").stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_shipped_base_model_is_the_default_pretraining_run():
    """The wheel's base model was made by this code with the default config: same key, same first losses."""
    record = json.loads((SHIPPED_BASE / "pretrain.json").read_text())
    assert shipped_base_key() == config_key(PretrainConfig(), 0) == record["key"]
    assert len(record["losses"]) == PretrainConfig().steps
    _, first_losses = train_base_model(PretrainConfig(), seed=0, progress=False, stop_after=5)
    assert first_losses == pytest.approx(record["losses"][:5], rel=1e-4)


def test_every_shipped_base_model_is_named_by_the_config_that_made_it(tmp_path):
    """The learning bench's 12000-step base ships beside the default one; asking for its config copies it."""
    assert len(SHIPPED_BASES) == 2
    for directory in SHIPPED_BASES:
        record = json.loads((directory / "pretrain.json").read_text())
        config = PretrainConfig(steps=record["config"]["steps"])
        assert config_key(config, record["seed"]) == record["key"] and len(record["losses"]) == config.steps
        assert shipped_base_for(config, record["seed"]) == directory
        path = ensure_base_model(tmp_path, config=config, progress=False)  # a copy: pre-training would take minutes
        weights = "transformer/diffusion_pytorch_model.safetensors"
        assert (path / weights).read_bytes() == (directory / weights).read_bytes()
    assert shipped_base_for(PretrainConfig(steps=7)) is None


def test_ensure_base_model_copies_the_shipped_base_instead_of_pretraining(tmp_path):
    path = ensure_base_model(tmp_path, progress=False)
    assert path.name == f"toy-base-{shipped_base_key()}"
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (path / weights).read_bytes() == (SHIPPED_BASE / weights).read_bytes()
    assert isinstance(load_toy_model(path), ToyFlowModel)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
