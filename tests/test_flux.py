"""The FLUX adapter on a tiny random FLUX built in code (tests/tiny_flux.py), saved in diffusers layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from mixgrpo.config import config_from_dict
from mixgrpo.grpo import group_advantages, policy_loss
from mixgrpo.models.base import FlowModel, repeat_conditioning
from mixgrpo.models.flux import (
    LORA_WEIGHT_NAME,
    FluxFlowModel,
    FluxSettings,
    latent_grid,
    latent_image_ids,
    pack_latents,
    precompute_prompt_embeddings,
    truncate_timestep,
    unpack_latents,
)
from mixgrpo.sampling import flow_sigmas, mixed_rollout, ode_step, sde_step
from mixgrpo.storage import IntegrityError, publish_dir
from tiny_flux import save_tiny_flux

PROMPTS = ["a red cat", "a blue dog on grass"]
MAX_LEN = 16


def settings(**overrides) -> FluxSettings:
    return FluxSettings(**{"height": 64, "width": 64, "max_sequence_length": MAX_LEN, **overrides})


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "base")


def load(flux_dir: Path, **overrides) -> FluxFlowModel:
    return FluxFlowModel.from_pretrained(flux_dir, settings(**overrides))


# --------------------------------------------------------------------------- packing and conventions


def test_packing_matches_flux_pipeline_and_round_trips() -> None:
    assert latent_grid(FluxSettings()) == (90, 90)
    latents = torch.randn(2, 16, 90, 90)
    packed = pack_latents(latents)
    assert packed.shape == (2, 2025, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 90, 90))
    assert torch.equal(unpack_latents(packed, 90, 90), latents)
    assert torch.equal(unpack_latents(packed, 90, 90), FluxPipeline._unpack_latents(packed, 720, 720, 8))
    assert torch.equal(latent_image_ids(90, 90), FluxPipeline._prepare_latent_image_ids(1, 45, 45, "cpu", torch.float32))
    with pytest.raises(ValueError, match="do not match a 88x90 latent grid"):
        unpack_latents(packed, 88, 90)
    with pytest.raises(ValueError, match="multiple of 16"):
        FluxSettings(height=712)


def test_timestep_is_truncated_to_a_multiple_of_1_over_1000(flux_dir: Path) -> None:
    sigmas = flow_sigmas(25, 3.0)
    expected = torch.tensor([int(1000 * s) / 1000 for s in sigmas.tolist()])
    assert torch.allclose(truncate_timestep(sigmas), expected, atol=1e-7)
    model = load(flux_dir)
    cond = model.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, *model.latent_shape())
    with torch.no_grad():
        v = model.velocity(x, torch.tensor(0.9869), cond)
        assert torch.equal(v, model.velocity(x, torch.tensor(0.9861), cond))  # both enter as 0.986
        assert not torch.equal(v, model.velocity(x, torch.tensor(0.9851), cond))  # 0.985
        per_row = model.velocity(x.expand(2, -1, -1), torch.tensor([0.9869, 0.9851]), repeat_conditioning(cond, 2))
        assert torch.allclose(per_row[0], v[0], atol=1e-6)


def test_sampling_and_decode_match_flux_pipeline(flux_dir: Path) -> None:
    """Text encoding, ids, guidance 3.5 and VAE scaling as FluxPipeline does them: same image from the same noise.

    The tiny scheduler has a static shift 3, so 2 pipeline steps are sigmas 1, 0.75, 0 = flow_sigmas(2, 3),
    multiples of 1/1000 (truncation changes nothing).
    """
    model = load(flux_dir)
    assert isinstance(model, FlowModel)
    noise = torch.randn(1, *model.latent_shape(), generator=torch.Generator().manual_seed(3))
    pipe = FluxPipeline.from_pretrained(flux_dir)
    expected = pipe(PROMPTS[0], num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
                    max_sequence_length=MAX_LEN, latents=noise.clone(), output_type="pt").images
    cond = model.encode_prompts(PROMPTS[:1])
    sigmas = flow_sigmas(2, 3.0)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.75, 0.0]))
    x = noise
    with torch.no_grad():
        for i in range(2):
            x = ode_step(x, model.velocity(x, sigmas[i], cond), sigmas, i)
    images = model.decode(x)
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.float32
    assert torch.allclose(images, expected, atol=1e-5), (images - expected).abs().max()
    # The decode formula itself: z / scaling_factor + shift_factor.
    assert (model.vae.config.scaling_factor, model.vae.config.shift_factor) == (0.3611, 0.1159)


# --------------------------------------------------------------------------- prompt embeddings


def test_embedding_cache_hits_skip_the_encoders(flux_dir: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "emb"
    first = load(flux_dir, embedding_cache_dir=str(cache_dir))
    cond = first.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert first.encoder_calls == 2  # distinct prompts only
    assert cond["encoder_hidden_states"].shape == (3, MAX_LEN, 32) and cond["pooled_projections"].shape == (3, 32)
    assert torch.equal(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][2])
    first.encode_prompts(PROMPTS)
    assert first.encoder_calls == 2

    second = load(flux_dir, embedding_cache_dir=str(cache_dir))  # a new process reading the same cache
    again = second.encode_prompts([PROMPTS[1], PROMPTS[0]])
    assert second.encoder_calls == 0 and second._text is None  # T5 / CLIP never loaded
    assert torch.equal(again["pooled_projections"], cond["pooled_projections"][[1, 0]])

    fresh = load(flux_dir).encode_prompts(PROMPTS)  # no disk cache: the encoders themselves
    for key in fresh:
        assert torch.equal(fresh[key], cond[key][:2])

    with pytest.raises(ValueError, match="belongs to other text encoders or another max_sequence_length"):
        load(flux_dir, embedding_cache_dir=str(cache_dir), max_sequence_length=MAX_LEN + 1)


def test_precompute_prompt_embeddings_writes_shards_the_adapter_reads(flux_dir: Path, tmp_path: Path) -> None:
    prompts = [f"prompt {i}" for i in range(5)] + ["prompt 0"]
    result = precompute_prompt_embeddings(flux_dir, prompts, tmp_path / "emb", shard_size=2, batch_size=2,
                                          max_sequence_length=MAX_LEN)
    assert (result.encoded, result.cached, len(result.shards)) == (5, 0, 3)
    assert sorted(p.name for p in (tmp_path / "emb").glob("shard-*.safetensors")) == sorted(p.name for p in result.shards)
    again = precompute_prompt_embeddings(flux_dir, prompts + ["prompt 5"], tmp_path / "emb", shard_size=2,
                                         max_sequence_length=MAX_LEN)
    assert (again.encoded, again.cached, len(again.shards)) == (1, 5, 1)
    model = load(flux_dir, embedding_cache_dir=str(tmp_path / "emb"))
    cached = model.encode_prompts(["prompt 3", "prompt 5"])
    assert model.encoder_calls == 0 and model._text is None
    direct = load(flux_dir).encode_prompts(["prompt 3", "prompt 5"])
    assert torch.equal(cached["encoder_hidden_states"], direct["encoder_hidden_states"])


# --------------------------------------------------------------------------- one MixGRPO step


def mixgrpo_step(model: FluxFlowModel, lr: float = 1e-3) -> dict[str, float]:
    """Rollout (4 steps, window 1..2, 2 prompts x 2 images, shared noise) -> rewards -> advantages ->
    recomputed window log-probs with grad -> clipped loss -> backward -> AdamW step."""
    group = 2
    sigmas = flow_sigmas(4, 3.0)
    window = range(1, 3)
    cond = repeat_conditioning(model.encode_prompts(PROMPTS), group)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(len(PROMPTS), *model.latent_shape(), generator=generator).repeat_interleave(group, 0)
    with torch.no_grad():
        rollout = mixed_rollout(lambda x, s: model.velocity(x, s, cond), noise, sigmas, window, 0.7, generator=generator)
    images = model.decode(rollout.sample)
    rewards = {"brightness": images.mean(dim=(1, 2, 3))}
    advantages = group_advantages(rewards, torch.arange(len(PROMPTS)).repeat_interleave(group))
    new_log_probs = []
    for k, i in enumerate(window):
        x = rollout.latents[:, k]
        step = sde_step(x, model.velocity(x, rollout.sigmas[i], cond), rollout.sigmas, i, 0.7,
                        prev_sample=rollout.latents[:, k + 1])
        new_log_probs.append(step.log_prob)
    new = torch.stack(new_log_probs, dim=1)
    out = policy_loss(new, rollout.log_probs, advantages)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    return {"ratio_mean": out.ratio_mean, "max_log_ratio": float((new.detach() - rollout.log_probs).abs().max())}


def test_mixgrpo_step_then_save_and_reload_gives_identical_outputs(flux_dir: Path, tmp_path: Path) -> None:
    model = load(flux_dir)
    before = {name: p.detach().clone() for name, p in model.module.named_parameters()}
    assert len(list(model.trainable_parameters())) == len(before)  # full fine-tuning
    stats = mixgrpo_step(model)
    assert stats["max_log_ratio"] < 1e-5 and stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # old == new policy
    changed = [n for n, p in model.module.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 0.9 * len(before), f"only {len(changed)} of {len(before)} tensors changed"
    for frozen in (model.vae, model.text_encoders().t5, model.text_encoders().clip):
        assert not any(p.requires_grad for p in frozen.parameters())

    out = model.save_pretrained(tmp_path / "tuned")
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    cond = model.encode_prompts(PROMPTS)
    x = torch.randn(2, *model.latent_shape())
    with torch.no_grad():
        expected = model.velocity(x, torch.tensor(0.6), cond)
        reloaded = FluxFlowModel.from_pretrained(flux_dir, settings(), tuned=out)
        assert torch.equal(reloaded.velocity(x, torch.tensor(0.6), cond), expected)
        assert not torch.equal(load(flux_dir).velocity(x, torch.tensor(0.6), cond), expected)
        # A plain diffusers load, and a FluxPipeline over a model dir with the tuned transformer in place.
        plain = FluxTransformer2DModel.from_pretrained(out / "transformer")
        model_dir = tmp_path / "model"
        shutil.copytree(flux_dir, model_dir)
        shutil.rmtree(model_dir / "transformer")
        shutil.copytree(out / "transformer", model_dir / "transformer")
        pipe = FluxPipeline.from_pretrained(model_dir)
        for module in (plain, pipe.transformer):
            reloaded.module = module
            assert torch.equal(reloaded.velocity(x, torch.tensor(0.6), cond), expected)


def test_gradient_checkpointing_gives_the_same_gradients(flux_dir: Path) -> None:
    grads = []
    for checkpointing in (False, True):
        model = load(flux_dir, gradient_checkpointing=checkpointing)
        model.module.train()
        assert model.module.is_gradient_checkpointing == checkpointing
        cond = model.encode_prompts(PROMPTS)
        x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(1))
        model.velocity(x, torch.tensor(0.5), cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# --------------------------------------------------------------------------- LoRA


def test_lora_trains_only_lora_weights_and_round_trips_through_diffusers(flux_dir: Path, tmp_path: Path) -> None:
    model = load(flux_dir, lora_rank=2, lora_alpha=4.0)
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # 1 double block x 8 projections + 1 single block x 3 (to_q/k/v), A and B each.
    assert len(trainable) == 2 * (8 + 3)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.module.named_parameters() if n in trainable}
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    mixgrpo_step(model, lr=1e-2)
    changed = {n for n, p in model.module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at 0 and moves: the LoRA now changes outputs

    out = model.save_pretrained(tmp_path / "lora")
    assert sorted(p.name for p in out.iterdir()) == [LORA_WEIGHT_NAME]
    cond = model.encode_prompts(PROMPTS)
    x = torch.randn(2, *model.latent_shape())
    with torch.no_grad():
        expected = model.velocity(x, torch.tensor(0.3), cond)
        assert not torch.equal(load(flux_dir).velocity(x, torch.tensor(0.3), cond), expected)
        pipe = FluxPipeline.from_pretrained(flux_dir)
        pipe.load_lora_weights(out)  # diffusers' own loader; alpha 4 / rank 2 comes from the file's metadata
        via_diffusers = load(flux_dir)
        via_diffusers.module = pipe.transformer
        assert torch.equal(via_diffusers.velocity(x, torch.tensor(0.3), cond), expected)
        reloaded = FluxFlowModel.from_pretrained(flux_dir, settings(), tuned=out)
        assert torch.equal(reloaded.velocity(x, torch.tensor(0.3), cond), expected)
        assert len(list(reloaded.trainable_parameters())) == len(trainable)


# --------------------------------------------------------------------------- loading


def test_loads_from_a_published_prefix_with_checksums(flux_dir: Path, tmp_path: Path) -> None:
    uri = (tmp_path / "store" / "flux").as_uri()
    publish_dir(flux_dir, uri)
    model = FluxFlowModel.from_pretrained(uri, settings(download_dir=str(tmp_path / "dl")))
    assert model.model_dir.parent == tmp_path / "dl"
    assert (model.model_dir / "MANIFEST.json").is_file()
    x = torch.randn(1, *model.latent_shape())
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS[:1])
        assert torch.equal(model.velocity(x, 0.5, cond), load(flux_dir).velocity(x, 0.5, cond))
    # A published file that changed after publication is refused.
    weights = tmp_path / "store" / "flux" / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        FluxFlowModel.from_pretrained(uri, settings(download_dir=str(tmp_path / "dl2")))


@pytest.mark.integration
def test_loads_from_s3(flux_dir: Path, tmp_path: Path, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_server.bucket}/models/tiny-flux"
    publish_dir(flux_dir, uri)
    model = FluxFlowModel.from_pretrained(uri, settings(download_dir=str(tmp_path / "dl")))
    assert model.latent_shape() == (16, 64)


def test_missing_directory_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a diffusers FLUX directory"):
        FluxFlowModel.from_pretrained(tmp_path, settings())


def test_trainer_builds_the_flux_policy_from_config(flux_dir: Path) -> None:
    from mixgrpo.policies import build_policy

    cfg = config_from_dict({"model": {"kind": "flux", "path": str(flux_dir), "height": 32, "width": 48,
                                      "max_sequence_length": MAX_LEN, "lora_rank": 2, "guidance": 4.0}})
    policy = build_policy(cfg, torch.device("cpu"))
    assert isinstance(policy, FluxFlowModel)
    assert policy.latent_shape() == (2 * 3, 64)  # 32x48 px -> 4x6 latents -> 2x3 tokens
    assert policy.settings.guidance == 4.0 and policy.uses_lora
    assert policy.decode(torch.zeros(1, 6, 64)).shape == (1, 3, 32, 48)


def test_load_tuned_into_an_existing_adapter_and_refuses_other_dirs(flux_dir: Path, tmp_path: Path) -> None:
    tuned = load(flux_dir, lora_rank=2)
    for p in tuned.trainable_parameters():
        torch.nn.init.normal_(p, std=0.1)
    tuned.save_pretrained(tmp_path / "lora")
    model = load(flux_dir)  # e.g. the evaluator's base adapter
    model.load_tuned(tmp_path / "lora")
    x = torch.randn(1, *model.latent_shape())
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS[:1])
        assert torch.equal(model.velocity(x, 0.4, cond), tuned.velocity(x, 0.4, cond))
    with pytest.raises(FileNotFoundError, match="neither transformer/config.json nor pytorch_lora_weights"):
        model.load_tuned(tmp_path)


def test_bf16_frozen_parts_and_bf16_base_with_float32_lora(flux_dir: Path) -> None:
    """The GPU set-up, run on the CPU: encoders and VAE in bf16, a bf16 transformer, float32 LoRA weights."""
    model = load(flux_dir, frozen_dtype="bfloat16", transformer_dtype="bfloat16", lora_rank=2)
    assert model.vae.dtype == torch.bfloat16 and model.text_encoders().t5.dtype == torch.bfloat16
    cond = model.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].dtype == torch.bfloat16
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in model.module.parameters() if not p.requires_grad} == {torch.bfloat16}
    x = torch.randn(2, *model.latent_shape())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model.velocity(x, torch.tensor(0.5), cond)
    v.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters())
    images = model.decode(x)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 64, 64)
