"""The sliding window: sequences over 400 iterations against hand-written expectations."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from mixgrpo.window import STRATEGIES, SlidingWindow, exp_decay_interval, linear_decay_interval

ITERATIONS = 400


def expand(blocks: list[tuple[int, int]], size: int = 4, last: int = 23) -> list[range]:
    """[(left edge, iterations there), ...] -> one window per iteration, truncated at ``last``."""
    windows = []
    for left, count in blocks:
        windows += [range(left, min(left + size, last))] * count
    return windows


def test_default_is_the_mixgrpo_setting():
    window = SlidingWindow()
    assert (window.num_steps, window.size, window.shift_interval, window.stride) == (25, 4, 25, 1)
    assert window.strategy == "progressive" and window.roll_back
    assert window.steps(0) == range(0, 4)


def test_progressive_tau25_over_400_iterations():
    # 16 windows of 25 iterations: left edges 0..15, each full (15 + 4 = 19 <= 23).
    expected = expand([(left, 25) for left in range(16)])
    assert SlidingWindow().schedule(ITERATIONS) == expected
    assert SlidingWindow().steps(24) == range(0, 4)
    assert SlidingWindow().steps(25) == range(1, 5)
    assert SlidingWindow().steps(49) == range(1, 5)
    assert SlidingWindow().steps(399) == range(15, 19)


def test_progressive_truncates_near_the_end_and_rolls_back():
    window = SlidingWindow(shift_interval=10)
    # left edges 0..22 for 10 iterations each (230 iterations), then 0 again.
    windows = window.schedule(ITERATIONS)
    assert windows[200] == range(20, 23)  # truncated: the last two transitions are never trained
    assert windows[210] == range(21, 23)
    assert windows[220] == range(22, 23)
    assert windows[229] == range(22, 23)
    assert windows[230] == range(0, 4)  # roll back
    assert windows[399] == range(16, 20)  # (399 - 230) // 10 = 16
    blocks = [(left, 10) for left in range(23)] + [(left, 10) for left in range(17)]
    assert windows == expand(blocks)
    assert all(len(w) >= 1 for w in windows)


def test_progressive_tau25_rolls_back_after_575_iterations():
    window = SlidingWindow()
    assert window.steps(574) == range(22, 23)
    assert window.steps(575) == range(0, 4)
    assert window.steps(575 + 25) == range(1, 5)


def test_progressive_stride_4_cycle():
    # Reference code without overlap moves by the window size: edges 0, 4, ..., 20, then 24 > 22 rolls back.
    window = SlidingWindow(shift_interval=20, stride=4)
    blocks = [(left, 20) for left in (0, 4, 8, 12, 16, 20)] * 4
    assert window.schedule(ITERATIONS) == expand(blocks)[:ITERATIONS]
    assert window.steps(100) == range(20, 23)


def test_progressive_without_roll_back_clamps_at_T_minus_w():
    window = SlidingWindow(shift_interval=10, roll_back=False)
    # paper: l <- min(l + 1, T - w = 21), then stays; window truncated at T - 2 = 23.
    blocks = [(left, 10) for left in range(21)] + [(21, ITERATIONS - 210)]
    assert window.schedule(ITERATIONS) == expand(blocks)
    assert window.steps(10_000) == range(21, 23)
    strided = SlidingWindow(shift_interval=10, stride=4, roll_back=False)
    assert [strided.left_edge(10 * k) for k in range(9)] == [0, 4, 8, 12, 16, 20, 21, 21, 21]
    # w <= 2 would give an empty window at T - w; the clamp stops at the last trainable step.
    small = SlidingWindow(size=1, shift_interval=1, roll_back=False)
    assert small.steps(22) == range(22, 23) and small.steps(1000) == range(22, 23)


def test_stride_zero_and_frozen_stay_at_zero():
    frozen = (SlidingWindow(stride=0), SlidingWindow(strategy="frozen"), SlidingWindow(strategy="frozen", stride=3))
    for window in frozen:
        assert window.schedule(ITERATIONS) == [range(0, 4)] * ITERATIONS
    assert SlidingWindow(strategy="frozen", size=6).steps(123) == range(0, 6)


def test_random_reproducible_bounded_and_seed_dependent():
    window = SlidingWindow(strategy="random", seed=7)
    lefts = [window.left_edge(m) for m in range(ITERATIONS)]
    assert lefts == [SlidingWindow(strategy="random", seed=7).left_edge(m) for m in range(ITERATIONS)]
    assert min(lefts) == 0 and max(lefts) == 19  # uniform on [0, T - 2 - w] = [0, 19], both ends reached
    assert all(window.steps(m) == range(left, left + 4) for m, left in enumerate(lefts))
    other = [SlidingWindow(strategy="random", seed=8).left_edge(m) for m in range(ITERATIONS)]
    assert sum(a != b for a, b in zip(lefts, other)) > 300  # P(equal) = 1/20 per iteration
    assert len(set(lefts[:50])) > 10  # changes every iteration, not every tau


def test_random_is_roughly_uniform():
    window = SlidingWindow(strategy="random", seed=0)
    counts = Counter(window.left_edge(m) for m in range(4000))
    assert sorted(counts) == list(range(20))
    # expected 200 per value, binomial std ~ 13.8: a 5-sigma band
    assert all(130 <= c <= 270 for c in counts.values()), counts
    chi2 = sum((c - 200) ** 2 / 200 for c in counts.values())
    assert chi2 < 50  # 19 degrees of freedom: P(chi2 > 50) < 1e-3


def test_random_full_size_window_is_always_at_zero():
    window = SlidingWindow(strategy="random", size=23)
    assert {window.left_edge(m) for m in range(100)} == {0}


def test_linear_decay_intervals():
    # int(10*(1 - l/23) + 1*l/23), worked out by hand for l = 0..23
    expected = [10, 9, 9, 8, 8, 8, 7, 7, 6, 6, 6, 5, 5, 4, 4, 4, 3, 3, 2, 2, 2, 1, 1, 1]
    assert [linear_decay_interval(left, 23, 10, 1) for left in range(24)] == expected
    window = SlidingWindow(strategy="linear_decay")
    assert [window.interval(left) for left in range(24)] == expected
    assert linear_decay_interval(0, 23, 4, 4) == 4


def test_linear_decay_sequence_over_400_iterations():
    intervals = [10, 9, 9, 8, 8, 8, 7, 7, 6, 6, 6, 5, 5, 4, 4, 4, 3, 3, 2, 2, 2, 1, 1]  # l = 0..22
    assert sum(intervals) == 120
    one_cycle = list(enumerate(intervals))
    expected = expand(one_cycle * 4)[:ITERATIONS]
    window = SlidingWindow(strategy="linear_decay")
    assert window.schedule(ITERATIONS) == expected
    assert window.steps(9) == range(0, 4) and window.steps(10) == range(1, 5)
    assert window.steps(119) == range(22, 23) and window.steps(120) == range(0, 4)


def test_exp_decay_intervals():
    # ceil(25*exp(-0.1*max(0, l - 13))): 25 up to l = 13, then by hand
    # l=14: 22.62 -> 23, 15: 20.47 -> 21, 16: 18.52 -> 19, 17: 16.76 -> 17, 18: 15.16 -> 16,
    # 19: 13.72 -> 14, 20: 12.41 -> 13, 21: 11.23 -> 12, 22: 10.16 -> 11, 23: 9.20 -> 10
    expected = [25] * 14 + [23, 21, 19, 17, 16, 14, 13, 12, 11, 10]
    assert [exp_decay_interval(left, 25) for left in range(24)] == expected
    assert exp_decay_interval(33, 25) == math.ceil(25 * math.exp(-2.0)) == 4


def test_exp_decay_sequence_over_400_iterations():
    window = SlidingWindow(strategy="exp_decay")
    # 14 edges x 25 = 350 iterations at l = 0..13, then l = 14 for 23 iterations, l = 15 for 21 more
    blocks = [(left, 25) for left in range(14)] + [(14, 23), (15, 21), (16, 19)]
    assert window.schedule(ITERATIONS) == expand(blocks)[:ITERATIONS]
    assert window.steps(372) == range(14, 18) and window.steps(373) == range(15, 19)
    # one period: 350 + 23+21+19+17+16+14+13+12+11 = 496
    assert window.steps(495) == range(22, 23) and window.steps(496) == range(0, 4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_steps_is_a_pure_function_of_the_iteration(strategy):
    window = SlidingWindow(strategy=strategy, shift_interval=7, seed=3)
    in_order = window.schedule(ITERATIONS)
    shuffled = list(range(ITERATIONS))
    shuffled.reverse()
    shuffled = shuffled[::2] + shuffled[1::2]
    for m in shuffled:
        assert window.steps(m) == in_order[m]
    # a fresh object (a resumed run) agrees too
    resumed = SlidingWindow(strategy=strategy, shift_interval=7, seed=3)
    assert [resumed.steps(m) for m in range(250, ITERATIONS)] == in_order[250:]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 24}, "num_steps - 2 = 23"),
        ({"size": 0}, "window size=0"),
        ({"stride": -1}, "stride=-1"),
        ({"shift_interval": 0}, "shift_interval=0"),
        ({"strategy": "cosine"}, "progressive, random, frozen, linear_decay, exp_decay"),
        ({"num_steps": 2, "size": 1}, "num_steps=2"),
        ({"interval_min": 0}, "interval_min=0"),
        ({"interval_max": 1, "interval_min": 2}, "interval_max=1"),
        ({"max_left": -2}, "max_left=-2"),
        ({"min_left": 5, "max_left": 4}, "min_left=5"),
        ({"min_left": -1}, "min_left=-1"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindow(**kwargs)


def test_bounded_left_edges_cycle_between_min_and_max_left():
    window = SlidingWindow(shift_interval=10, min_left=4, max_left=11)
    cycle = expand([(left, 10) for left in range(4, 12)])
    assert window.schedule(240) == (cycle * 3)[:240]
    # max_left alone: from 0 to 11, then back to 0 (the paper's range would go on to 22)
    upper = SlidingWindow(shift_interval=10, max_left=11)
    assert [upper.left_edge(m) for m in range(0, 260, 10)] == [*range(12), *range(12), 0, 1]
    # the defaults are the paper's / reference's range; a bound beyond it (a preset's, with fewer steps) is that range
    assert SlidingWindow(max_left=22).schedule(ITERATIONS) == SlidingWindow().schedule(ITERATIONS)
    assert SlidingWindow(num_steps=6, max_left=11).schedule(40) == SlidingWindow(num_steps=6).schedule(40)
    # the toy preset's 4..11 on a 6-step schedule: both bounds clamp to the last trainable edge, 3
    assert {SlidingWindow(num_steps=6, size=2, min_left=4, max_left=11).left_edge(m) for m in range(100)} == {3}


def test_bounded_left_edges_for_the_other_strategies():
    assert {SlidingWindow(strategy="frozen", min_left=5).left_edge(m) for m in range(50)} == {5}
    edges = Counter(SlidingWindow(strategy="random", min_left=4, max_left=11, seed=1).left_edge(m) for m in range(2000))
    assert set(edges) == set(range(4, 12))
    clamped = SlidingWindow(roll_back=False, shift_interval=10, min_left=2, max_left=6)
    assert [clamped.left_edge(m) for m in range(0, 100, 10)] == [2, 3, 4, 5, 6, 6, 6, 6, 6, 6]


def test_negative_iteration_is_rejected():
    with pytest.raises(ValueError, match="iteration=-1"):
        SlidingWindow().steps(-1)
    with pytest.raises(ValueError, match="iteration=-3"):
        SlidingWindow(strategy="random").left_edge(-3)


def test_window_is_frozen():
    window = SlidingWindow()
    with pytest.raises(AttributeError):
        window.size = 3  # type: ignore[misc]
