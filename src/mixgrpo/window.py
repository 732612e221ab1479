"""The sliding window of SDE steps (MixGRPO Algorithm 1; spec section 4).

Only the denoising steps inside the window are stochastic and optimised; every other step is a
deterministic ODE step. The window is a **pure function of the iteration number** (and the seed):
there is no step counter, so a run resumed at iteration ``m`` trains the same steps as an
uninterrupted one.

Notation: ``T`` = ``num_steps`` sampling steps, ``w`` = ``size``, ``tau`` = ``shift_interval``,
``s`` = ``stride``, ``l`` = the window's left edge. Only the transitions ``0 .. T-3`` can be
trained (the reference code excludes the last two), so the window at left edge ``l`` is
``range(l, min(l + w, T - 2))``.

Code vs paper (the reference code is the default):
  * ``roll_back=True`` (reference code, Tencent-Hunyuan/MixGRPO ``GRPOTrainingStates``): the left
    edge moves ``l <- l + s`` every ``tau`` iterations and goes back to 0 once it passes the last
    trainable step; the schedule is periodic. The reference's test is ``l > T - 2``, which lets
    ``l = T - 2`` through with the empty window ``range(T-2, T-2)`` (its training step then has
    nothing to optimise and fails). Ours rolls back at ``l > T - 3``, so every window holds at
    least one step; the two agree whenever a left edge never lands exactly on ``T - 2``.
  * ``roll_back=False`` (paper): ``l <- min(l + s, T - w)``, then ``l`` stays there. For
    ``w <= 2`` that edge would give an empty window, so the clamp is ``min(T - w, T - 3)``.

Not in the paper (off by default): ``min_left`` / ``max_left`` bound the left edge, so the window
visits only ``l`` in ``[min_left, max_left]`` (progressive: from ``min_left`` up to ``max_left``, then back
to ``min_left``; random: uniform there; frozen: at ``min_left``). On the toy world a group's shape
reward spreads 3x less once the window passes step 11 (README), so later windows teach little.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, get_args

Strategy = Literal["progressive", "random", "frozen", "linear_decay", "exp_decay"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

# Exponential decay of the shift interval (reference code constants): the interval stays at tau
# up to this left edge, then decays with this rate per step.
EXP_DECAY_THRESHOLD = 13
EXP_DECAY_RATE = 0.1


def linear_decay_interval(left: int, last: int, interval_max: int, interval_min: int) -> int:
    """Iterations spent at left edge ``l``: ``int(max*(1 - l/L) + min*l/L)`` with ``L = T - 2``.

    Computed in integers (``(max*(L - l) + min*l) // L``), so no float rounding at exact values.
    """
    return max(interval_min, (interval_max * (last - left) + interval_min * left) // last)


def exp_decay_interval(left: int, shift_interval: int) -> int:
    """Iterations spent at left edge ``l``: ``ceil(tau * exp(-0.1 * max(0, l - 13)))``."""
    return math.ceil(shift_interval * math.exp(-EXP_DECAY_RATE * max(0, left - EXP_DECAY_THRESHOLD)))


@dataclass(frozen=True)
class SlidingWindow:
    """Which denoising steps are SDE (and trained) at each GRPO iteration.

    Args:
        num_steps: ``T``, the number of sampling steps (25 in MixGRPO).
        size: ``w``, steps per window, ``1 <= w <= T - 2``.
        shift_interval: ``tau``, iterations before the window moves (progressive; the starting
            interval of ``exp_decay``).
        stride: ``s``, steps the left edge moves each time (0 keeps it at 0).
        strategy: "progressive" (default; ``l = floor(m/tau)*s``), "random" (``l`` uniform in
            ``[0, T-2-w]`` per iteration, drawn from ``(seed, iteration)``), "frozen" (``l = 0``
            always; ``stride``, ``shift_interval`` and ``roll_back`` play no part),
            "linear_decay" (iterations at edge ``l``: ``int(max*(1-l/(T-2)) + min*l/(T-2))``),
            "exp_decay" (iterations at edge ``l``: ``ceil(tau*exp(-0.1*max(0, l-13)))``).
        roll_back: restart at ``l = 0`` after the last trainable step (reference code) instead
            of clamping at the paper's ``T - w``. See the module docstring.
        seed: seed of the "random" strategy.
        interval_max, interval_min: the "linear_decay" interval at ``l = 0`` and ``l = T - 2``.
        min_left, max_left: the lowest and highest left edge the window takes (``max_left`` -1, or anything
            above ``T - 3``, = up to the last trainable step; both clamp to ``T - 3``); see the module docstring.
    """

    num_steps: int = 25
    size: int = 4
    shift_interval: int = 25
    stride: int = 1
    strategy: Strategy = "progressive"
    roll_back: bool = True
    seed: int = 0
    interval_max: int = 10
    interval_min: int = 1
    min_left: int = 0
    max_left: int = -1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown window strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.num_steps < 3:
            raise ValueError(f"num_steps={self.num_steps}: need >= 3 sampling steps (the last two are never trained)")
        if not 1 <= self.size <= self.num_steps - 2:
            raise ValueError(
                f"window size={self.size} must be in [1, num_steps - 2 = {self.num_steps - 2}] "
                "(the last two transitions are never trained); lower size or raise num_steps"
            )
        if self.stride < 0:
            raise ValueError(f"stride={self.stride} must be >= 0 (0 keeps the window at the first step)")
        if self.shift_interval < 1:
            raise ValueError(f"shift_interval={self.shift_interval} must be >= 1 iteration")
        if self.interval_min < 1 or self.interval_max < self.interval_min:
            raise ValueError(
                f"linear decay intervals need 1 <= interval_min <= interval_max, "
                f"got interval_min={self.interval_min}, interval_max={self.interval_max}"
            )
        if self.min_left < 0 or (self.max_left >= 0 and self.min_left > self.max_left):
            raise ValueError(f"min_left={self.min_left} must be in [0, max_left={self.max_left}] (max_left -1: >= 0)")
        if self.max_left < -1:
            raise ValueError(f"max_left={self.max_left} must be >= 0, or -1 (no bound)")

    @property
    def last_trainable(self) -> int:
        """``T - 2``: the window never reaches this transition index."""
        return self.num_steps - 2

    @property
    def highest_left(self) -> int:
        """The highest left edge allowed: ``max_left``, at most ``T - 3`` (the last one holding a trainable step)."""
        return self.num_steps - 3 if self.max_left < 0 else min(self.max_left, self.num_steps - 3)

    @property
    def lowest_left(self) -> int:
        """The lowest left edge: ``min_left``, at most :attr:`highest_left` (a preset's bounds with fewer steps)."""
        return min(self.min_left, self.highest_left)

    def interval(self, left: int) -> int:
        """Iterations the window stays at left edge ``left`` (the moving strategies)."""
        if self.strategy == "linear_decay":
            return linear_decay_interval(left, self.last_trainable, self.interval_max, self.interval_min)
        if self.strategy == "exp_decay":
            return exp_decay_interval(left, self.shift_interval)
        return self.shift_interval

    def _left_edges(self) -> list[int]:
        """The left edges in visiting order: one period (roll back) or up to the clamp."""
        if self.stride == 0:
            return [self.lowest_left]
        if self.roll_back:
            return list(range(self.lowest_left, self.highest_left + 1, self.stride))
        clamp = max(self.lowest_left, min(self.num_steps - self.size, self.highest_left))
        return [*range(self.lowest_left, clamp, self.stride), clamp]

    def left_edge(self, iteration: int) -> int:
        """``l`` at 0-based ``iteration``: walks the per-edge intervals (no stored state)."""
        if iteration < 0:
            raise ValueError(f"iteration={iteration} must be >= 0 (iterations are counted from 0)")
        if self.strategy == "frozen":
            return self.lowest_left
        if self.strategy == "random":
            # str seeds are hashed with SHA-512 by random.Random: stable across runs and platforms.
            rng = random.Random(f"mixgrpo.window:{self.seed}:{iteration}")
            low = self.lowest_left
            return rng.randint(low, max(low, min(self.highest_left, self.last_trainable - self.size)))
        edges = self._left_edges()
        periodic = self.roll_back and len(edges) > 1
        remaining = iteration % sum(map(self.interval, edges)) if periodic else iteration
        for left in edges[:-1]:
            if remaining < self.interval(left):
                return left
            remaining -= self.interval(left)
        return edges[-1]

    def steps(self, iteration: int) -> range:
        """Window at ``iteration``: ``range(l, min(l + w, T - 2))``."""
        left = self.left_edge(iteration)
        return range(left, min(left + self.size, self.last_trainable))

    def schedule(self, num_iterations: int) -> list[range]:
        """``[steps(0), ..., steps(num_iterations - 1)]``, for plots and averaging costs."""
        return [self.steps(m) for m in range(num_iterations)]
