"""Best-checkpoint selection and early stopping on never-optimised measures (against reward hacking).

The trainer evaluates the policy on validation prompts (never trained on, never reported) every
``eval_every`` iterations. An evaluation *qualifies* when the measures the trainer never optimises
hold against the base model's evaluation (iteration 0):

    diversity >= min_diversity * diversity_base   and   h >= h_base - tolerance for every held-out reward h

Among qualifying evaluations the best has the highest combined optimised reward
``mean_k r_k`` (k over the optimised rewards); the base itself is a candidate, so weights that only
hack the rewards are never preferred to the base. Early stopping ends the run after ``patience``
evaluations in a row without a new best.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DIVERSITY_KEY = "heldout_diversity"
VALIDATION_COUNT = 12  # prompts set aside from the training prompts for checkpoint selection and learning-rate sweeps


def combined_reward(evaluation: dict[str, float], optimised: list[str]) -> float:
    """``mean_k r_k`` over the optimised reward names."""
    return sum(evaluation[name] for name in optimised) / len(optimised)


def failed_guards(evaluation: dict[str, float], base: dict[str, float], held_out: list[str],
                  min_diversity: float, tolerance: float) -> list[str]:
    """The never-optimised measures that fell too far below the base's (empty = the evaluation qualifies)."""
    failed = []
    if DIVERSITY_KEY in evaluation and DIVERSITY_KEY in base and evaluation[DIVERSITY_KEY] < min_diversity * base[DIVERSITY_KEY]:
        failed.append(f"{DIVERSITY_KEY} {evaluation[DIVERSITY_KEY]:.4f} < {min_diversity:g} x base {base[DIVERSITY_KEY]:.4f}")
    for name in held_out:
        if evaluation[name] < base[name] - tolerance:
            failed.append(f"{name} {evaluation[name]:.4f} < base {base[name]:.4f} - {tolerance:g}")
    return failed


@dataclass
class BestTracker:
    """Keeps the best qualifying evaluation so far; ``update`` says whether the new one is the best."""

    optimised: list[str]
    held_out: list[str]
    min_diversity: float = 0.8
    tolerance: float = 0.01
    patience: int = 0
    base: dict[str, float] = field(default_factory=dict)
    best_iteration: int = 0
    best_score: float = float("-inf")
    since_best: int = 0
    history: list[dict] = field(default_factory=list)

    def update(self, iteration: int, evaluation: dict[str, float]) -> bool:
        """Record the evaluation at ``iteration`` (the first one is the base); True if it is the new best."""
        if not self.base:
            self.base = dict(evaluation)
        failed = failed_guards(evaluation, self.base, self.held_out, self.min_diversity, self.tolerance)
        score = combined_reward(evaluation, self.optimised)
        is_best = not failed and score > self.best_score
        self.history.append({"iteration": iteration, "combined": score, "qualifies": not failed, "failed": failed,
                             "measures": dict(evaluation)})
        if is_best:
            self.best_iteration, self.best_score, self.since_best = iteration, score, 0
        elif self.history[:-1]:  # the base evaluation does not count against the patience
            self.since_best += 1
        return is_best

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> BestTracker:
        return cls(**state)
