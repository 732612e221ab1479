"""Group advantages and the clipped policy loss on hand-made numbers."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from mixgrpo.grpo import group_advantages, group_advantages_with_stats, policy_loss

NAN = float("nan")
S12 = math.sqrt(12.0)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, t(expected), atol=tol, rtol=0)


# group 0: samples 0-2, group 1: samples 3-5
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
# a: group 0 mean 2, std 1 -> [-1, 0, 1]; group 1 mean 12, std sqrt(12) -> [-2, -2, 4]/sqrt(12)
# b: group 0 mean 2, std 2 -> [-1, 1, 0]; group 1 constant -> 0
REWARDS = {"a": t([1.0, 2.0, 3.0, 10.0, 10.0, 16.0]), "b": t([0.0, 4.0, 2.0, 5.0, 5.0, 5.0])}


def test_two_groups_two_rewards_weighted():
    advantages = group_advantages(REWARDS, GROUPS, weights={"a": 3.0, "b": 1.0})
    # 0.75*A_a + 0.25*A_b
    close(advantages, [-1.0, 0.25, 0.75, -1.5 / S12, -1.5 / S12, 3.0 / S12])
    assert advantages.dtype == torch.float32


def test_equal_weights_by_default():
    advantages = group_advantages(REWARDS, GROUPS)
    close(advantages, [-1.0, 0.5, 0.5, -1.0 / S12, -1.0 / S12, 2.0 / S12])


def test_single_reward_matches_an_independent_loop():
    rng = random.Random(5)
    ids = [rng.choice([3, 11, -4, 1000]) for _ in range(40)]
    values = [rng.gauss(0.3, 0.05) for _ in ids]
    expected = []
    for gid, value in zip(ids, values):
        members = [v for g, v in zip(ids, values) if g == gid]
        expected.append((value - statistics.mean(members)) / (statistics.stdev(members) + 1e-8))
    advantages = group_advantages({"hps": t(values)}, torch.tensor(ids))
    close(advantages, expected, tol=1e-4)


def test_non_contiguous_group_ids_give_the_same_advantages():
    order = [3, 0, 4, 1, 5, 2]  # interleave the two groups
    ids = torch.tensor([-7, 42, -7, 42, -7, 42])  # group 1 -> -7, group 0 -> 42
    shuffled = {name: values[order] for name, values in REWARDS.items()}
    advantages, stats = group_advantages_with_stats(shuffled, ids, weights={"a": 3.0, "b": 1.0})
    reference = group_advantages(REWARDS, GROUPS, weights={"a": 3.0, "b": 1.0})
    close(advantages, reference[order].tolist())
    assert stats.groups.tolist() == [-7, 42]
    close(stats.rewards["a"].mean, [12.0, 2.0])
    close(stats.rewards["a"].std, [S12, 1.0])
    assert stats.rewards["b"].count.tolist() == [3, 3]


def test_clamp_to_five_with_an_outlier():
    # 36 samples, one 1 among 35 zeros: mean 1/36, std 1/6, outlier A = 35/6 = 5.83 -> 5
    rewards = {"r": t([1.0] + [0.0] * 35)}
    ids = torch.zeros(36, dtype=torch.long)
    advantages, stats = group_advantages_with_stats(rewards, ids)
    assert advantages[0].item() == pytest.approx(5.0)
    close(advantages[1:], [-1.0 / 6.0] * 35)
    assert stats.num_clipped == 1
    unclipped = group_advantages(rewards, ids, clip=10.0)
    assert unclipped[0].item() == pytest.approx(35.0 / 6.0, abs=1e-5)
    assert group_advantages(rewards, ids, clip=1.0)[0].item() == pytest.approx(1.0)


def test_reward_mix_normalises_the_weighted_sum():
    # R = 0.5*(a + b): group 0 [0.5, 3, 2.5] (mean 2, std sqrt(1.75)); group 1 [7.5, 7.5, 10.5] (mean 8.5, std sqrt(3))
    advantages, stats = group_advantages_with_stats(REWARDS, GROUPS, mix="reward")
    s0, s1 = math.sqrt(1.75), math.sqrt(3.0)
    close(advantages, [-1.5 / s0, 1.0 / s0, 0.5 / s0, -1.0 / s1, -1.0 / s1, 2.0 / s1])
    assert stats.mixed is not None
    close(stats.mixed.mean, [2.0, 8.5])
    weighted = group_advantages(REWARDS, GROUPS, weights={"a": 1.0, "b": 3.0}, mix="reward")
    # R = 0.25a + 0.75b: group 0 [0.25, 3.5, 2.25] mean 2, devs [-1.75, 1.5, 0.25], var (3.0625+2.25+0.0625)/2
    s = math.sqrt(5.375 / 2)
    close(weighted[:3], [-1.75 / s, 1.5 / s, 0.25 / s])


def test_failed_rewards_are_masked_out_of_the_statistics():
    rewards = {
        "a": t([1.0, 2.0, NAN, 10.0, NAN, 16.0]),
        "b": t([0.0, 2.0, 4.0, 5.0, NAN, 5.0]),
    }
    advantages, stats = group_advantages_with_stats(rewards, GROUPS, weights={"a": 3.0, "b": 1.0})
    h = math.sqrt(0.5)
    # a group 0 over [1, 2]: [-h, h]; b group 0: [-1, 0, 1]; sample 2 has only b -> A_b = 1
    # a group 1 over [10, 16]: [-h, h]; b group 1 constant -> 0; sample 4 has nothing -> 0
    close(advantages, [0.75 * -h - 0.25, 0.75 * h, 1.0, 0.75 * -h, 0.0, 0.75 * h])
    assert stats.valid.tolist() == [True, True, True, True, False, True]
    assert stats.num_invalid == 1
    assert stats.num_failed == {"a": 2, "b": 1}
    close(stats.rewards["a"].mean, [1.5, 13.0])
    assert stats.rewards["a"].count.tolist() == [2, 2]
    assert torch.isfinite(advantages).all()


def test_a_reward_with_one_valid_value_in_its_group_is_not_used():
    rewards = {"a": t([1.0, NAN, 3.0, 5.0]), "b": t([0.0, 2.0, 1.0, 2.0])}
    advantages, stats = group_advantages_with_stats(rewards, torch.tensor([0, 0, 1, 1]))
    h = math.sqrt(0.5)
    # group 0: a has a single valid value (no std) -> only b counts: [-h, h]; group 1: mean of a and b
    close(advantages, [-h, h, -h, h])
    assert math.isnan(stats.rewards["a"].std[0].item())
    assert stats.valid.all()


def test_reward_mix_drops_samples_with_any_failed_reward():
    rewards = {"a": t([1.0, 2.0, 3.0, 10.0, 10.0, 16.0]), "b": t([0.0, 4.0, NAN, 5.0, 5.0, 5.0])}
    advantages, stats = group_advantages_with_stats(rewards, GROUPS, mix="reward")
    h = math.sqrt(0.5)
    s1 = math.sqrt(3.0)
    close(advantages, [-h, h, 0.0, -1.0 / s1, -1.0 / s1, 2.0 / s1])
    assert stats.valid.tolist() == [True, True, False, True, True, True]


def test_failed_rewards_raise_when_asked():
    rewards = {"a": t([1.0, NAN, 3.0, NAN]), "b": t([0.0, 1.0, 2.0, 3.0])}
    with pytest.raises(ValueError, match=r"reward 'a' failed .* for 2 of 4 samples"):
        group_advantages(rewards, torch.tensor([0, 0, 1, 1]), on_failure="raise")
    clean = group_advantages({"b": rewards["b"]}, torch.tensor([0, 0, 1, 1]), on_failure="raise")
    close(clean, [-math.sqrt(0.5), math.sqrt(0.5)] * 2)


def test_inputs_are_not_modified_and_no_grad_is_kept():
    rewards = {"a": t([1.0, NAN, 3.0, 4.0]).requires_grad_()}
    group_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    assert math.isnan(rewards["a"][1].item())
    assert not group_advantages(rewards, torch.tensor([0, 0, 1, 1])).requires_grad


@pytest.mark.parametrize(
    ("rewards", "ids", "kwargs", "message"),
    [
        ({}, [0, 0], {}, "rewards is empty"),
        ({"a": []}, [], {}, "empty batch"),
        ({"a": [1.0, 2.0, 3.0]}, [0, 0], {}, r"reward 'a' has shape \(3,\) but group_ids has 2"),
        ({"a": [1.0, 2.0]}, [0, 0], {"weights": {"a": 1.0, "hps": 1.0}}, r"unknown rewards \['hps'\]; known: a"),
        ({"a": [1.0, 2.0], "b": [1.0, 2.0]}, [0, 0], {"weights": {"a": 1.0}}, r"no weight for rewards \['b'\]"),
        ({"a": [1.0, 2.0]}, [0, 0], {"weights": {"a": -1.0}}, "finite and >= 0"),
        ({"a": [1.0, 2.0], "b": [1.0, 2.0]}, [0, 0], {"weights": {"a": 0.0, "b": 0.0}}, "all reward weights are 0"),
        ({"a": [1.0, 2.0]}, [0, 0], {"mix": "sum"}, "unknown mix 'sum'; choose one of advantage, reward"),
        ({"a": [1.0, 2.0]}, [0, 0], {"on_failure": "zero"}, "unknown on_failure 'zero'; choose one of mask, raise"),
        ({"a": [1.0, 2.0]}, [0, 0], {"clip": 0.0}, "clip=0.0 must be > 0"),
        (
            {"a": [1.0, 2.0, 3.0]},
            [0, 0, 5],
            {},
            r"group of one \(group ids \[5\]\): GRPO needs >= 2 samples per prompt; set group_size >= 2",
        ),
    ],
)
def test_bad_advantage_inputs(rewards, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages({k: t(v) for k, v in rewards.items()}, torch.tensor(ids, dtype=torch.long), **kwargs)


def test_group_ids_must_be_integers():
    with pytest.raises(ValueError, match="1-D integer tensor"):
        group_advantages({"a": t([1.0, 2.0])}, t([0.0, 0.0]))


# ---------------------------------------------------------------- policy loss


def test_ratio_is_one_and_loss_is_minus_mean_advantage_when_policies_agree():
    new = torch.tensor([-1.3, 0.2, 4.0], requires_grad=True)
    advantages = t([1.0, -0.5, 2.0])
    out = policy_loss(new, new.detach().clone(), advantages)
    assert out.ratio_mean == 1.0
    assert out.loss.item() == pytest.approx(-2.5 / 3)
    assert out.clip_fraction == 0.0 and out.approx_kl == 0.0
    out.loss.backward()
    close(new.grad, (-advantages / 3).tolist())  # d(-A*ratio)/dlogp = -A*ratio at ratio 1


def test_clipping_on_hand_made_numbers():
    ratios = [1.5, 0.5, 1.5, 0.5, 1.05]
    advantages = t([1.0, 1.0, -1.0, -1.0, 2.0])
    old = t([0.3, -0.1, 0.0, 2.0, -4.0])
    new = (old + torch.log(t(ratios))).requires_grad_()
    out = policy_loss(new, old, advantages, clip_range=0.1)
    # max(-A r, -A clip(r)): A>0 r=1.5 -> -1.1 (clipped); A>0 r=0.5 -> -0.5;
    # A<0 r=1.5 -> 1.5; A<0 r=0.5 -> 0.9 (clipped)
    # A=2 r=1.05 (inside) -> -2.1
    assert out.loss.item() == pytest.approx((-1.1 - 0.5 + 1.5 + 0.9 - 2.1) / 5, abs=1e-6)
    assert out.policy_loss == pytest.approx(-0.26, abs=1e-6)
    assert out.clip_fraction == pytest.approx(0.8)
    assert out.ratio_mean == pytest.approx(1.01, abs=1e-6)
    assert out.approx_kl == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in ratios) / 5, abs=1e-6)
    out.loss.backward()
    # clipped terms give no gradient; unclipped give -A*ratio/5
    close(new.grad, [0.0, -0.1, 0.3, 0.0, -0.42])


def test_kl_term_value_and_gradient():
    old = t([1.0, 2.0])
    new = (old + t([0.1, -0.2])).requires_grad_()
    out = policy_loss(new, old, t([0.0, 0.0]), kl_coeff=0.5)
    assert out.approx_kl == pytest.approx(0.5 * (0.01 + 0.04) / 2)
    assert out.loss.item() == pytest.approx(0.5 * 0.0125)
    out.loss.backward()
    close(new.grad, [0.5 * 0.1 / 2, 0.5 * -0.2 / 2])


def test_window_steps_broadcast_the_advantage():
    old = torch.zeros(2, 3)
    new = torch.log(t([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]])).requires_grad_()
    out = policy_loss(new, old, t([1.0, -2.0]), clip_range=0.2)
    # row A=1: [-1, -1.2, -0.5]; row A=-2: [2, 3, 1.6]
    assert out.loss.item() == pytest.approx((-1 - 1.2 - 0.5 + 2 + 3 + 1.6) / 6, abs=1e-6)
    assert out.clip_fraction == pytest.approx(4 / 6)
    out.loss.backward()
    close(new.grad, [[-1 / 6, 0.0, -0.5 / 6], [2 / 6, 3 / 6, 0.0]])


def test_gradient_reaches_new_log_probs_only():
    old = t([0.0, 0.1]).requires_grad_()
    new = t([0.05, 0.0]).requires_grad_()
    out = policy_loss(new, old, t([1.0, -1.0]), clip_range=1e-4, kl_coeff=0.1)
    assert out.loss.requires_grad and out.loss.ndim == 0
    out.loss.backward()
    assert new.grad is not None and bool((new.grad != 0).all())
    assert old.grad is None
    assert isinstance(out.clip_fraction, float) and isinstance(out.ratio_mean, float)


@pytest.mark.parametrize(
    ("new_shape", "old_shape", "adv_shape", "kwargs", "message"),
    [
        ((4,), (4,), (4,), {"clip_range": 0.0}, "clip_range=0.0 must be > 0"),
        ((4,), (4,), (4,), {"clip_range": -0.1}, "clip_range=-0.1 must be > 0"),
        ((4,), (4,), (4,), {"kl_coeff": -1.0}, "kl_coeff=-1.0 must be >= 0"),
        ((4,), (3,), (4,), {}, r"log_probs_new \(4,\) and log_probs_old \(3,\)"),
        ((4, 2), (4, 2), (2,), {}, r"advantages \(2,\) must be \[B\] = \[4\]"),
        ((4, 2), (4, 2), (4, 2), {}, r"advantages \(4, 2\) must be"),
        ((4, 2, 1), (4, 2, 1), (4,), {}, r"non-empty \[B\] or \[B, S\]"),
    ],
)
def test_bad_policy_loss_inputs(new_shape, old_shape, adv_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        policy_loss(torch.zeros(new_shape), torch.zeros(old_shape), torch.zeros(adv_shape), **kwargs)


def test_reference_kl_value_and_gradient_on_hand_made_numbers():
    from mixgrpo.grpo import reference_kl

    mean = torch.tensor([[1.0, 3.0], [0.0, 0.0]], requires_grad=True)
    mean_ref = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    std = torch.tensor(2.0)
    kl = reference_kl(mean, mean_ref, std)
    # (mu - mu_ref)^2 / (2 s^2), averaged over the elements: row 0 (1 + 4)/8/2, row 1 (0 + 4)/8/2
    assert kl.tolist() == pytest.approx([5 / 16, 4 / 16])
    kl.sum().backward()
    # d/dmu = (mu - mu_ref) / s^2 / elements
    assert mean.grad.flatten().tolist() == pytest.approx([1 / 8, 2 / 8, 0.0, -2 / 8])
    with pytest.raises(ValueError, match="same shape"):
        reference_kl(mean, mean_ref[:1], std)


def test_reference_anchor_value_and_gradient_on_hand_made_numbers():
    from mixgrpo.grpo import reference_anchor

    x0 = torch.tensor([[1.0, 3.0], [0.0, 0.0]], requires_grad=True)
    x0_ref = torch.tensor([[0.0, 1.0], [0.0, 2.0]], requires_grad=True)
    anchor = reference_anchor(x0, x0_ref)
    # mean((x0 - x0_ref)^2) per row: row 0 (1 + 4) / 2, row 1 (0 + 4) / 2
    assert anchor.tolist() == pytest.approx([5 / 2, 4 / 2])
    anchor.sum().backward()
    # d/dx0 = 2 (x0 - x0_ref) / elements; the reference gets no gradient
    assert x0.grad.flatten().tolist() == pytest.approx([1.0, 2.0, 0.0, -2.0])
    assert x0_ref.grad is None
    with pytest.raises(ValueError, match="same shape"):
        reference_anchor(x0, x0_ref[:1])
