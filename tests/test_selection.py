"""Best-checkpoint selection and early stopping on never-optimised measures (mixgrpo.selection)."""

import pytest

from mixgrpo.selection import BestTracker, combined_reward, failed_guards

OPTIMISED = ["a", "b"]
HELD_OUT = ["realism"]


def evaluation(a: float, b: float, realism: float = 0.9, diversity: float = 0.1) -> dict[str, float]:
    return {"a": a, "b": b, "realism": realism, "heldout_diversity": diversity}


def test_combined_reward_is_the_mean_of_the_optimised():
    assert combined_reward(evaluation(0.2, 0.6), OPTIMISED) == pytest.approx(0.4)


def test_guards_name_what_fell():
    base = evaluation(0.5, 0.5)
    assert failed_guards(evaluation(0.9, 0.9), base, HELD_OUT, 0.8, 0.01) == []
    failed = failed_guards(evaluation(0.9, 0.9, realism=0.85, diversity=0.05), base, HELD_OUT, 0.8, 0.01)
    assert len(failed) == 2 and failed[0].startswith("heldout_diversity") and failed[1].startswith("realism")
    # within the tolerance and just above 80% of the diversity: qualifies
    assert failed_guards(evaluation(0.9, 0.9, realism=0.891, diversity=0.0801), base, HELD_OUT, 0.8, 0.01) == []


def test_picks_the_best_qualifying_evaluation_on_a_synthetic_curve():
    # the optimised reward keeps rising, but from iteration 30 on diversity collapses (reward hacking)
    curve = [(0, evaluation(0.5, 0.5)), (10, evaluation(0.6, 0.6)), (20, evaluation(0.7, 0.66)),
             (30, evaluation(0.9, 0.9, diversity=0.03)), (40, evaluation(0.95, 0.95, diversity=0.02)),
             (50, evaluation(0.65, 0.65))]
    tracker = BestTracker(OPTIMISED, HELD_OUT)
    news = [tracker.update(it, ev) for it, ev in curve]
    assert news == [True, True, True, False, False, False]
    assert tracker.best_iteration == 20 and tracker.best_score == pytest.approx(0.68)
    assert [h["qualifies"] for h in tracker.history] == [True, True, True, False, False, True]
    assert [h["measures"] for h in tracker.history] == [ev for _, ev in curve]  # logged: what the guards saw


def test_the_base_wins_when_every_evaluation_hacks():
    tracker = BestTracker(OPTIMISED, HELD_OUT)
    tracker.update(0, evaluation(0.5, 0.5))
    tracker.update(10, evaluation(0.9, 0.9, realism=0.5))
    assert tracker.best_iteration == 0


def test_early_stopping_after_patience_evaluations_without_a_new_best():
    tracker = BestTracker(OPTIMISED, HELD_OUT, patience=2)
    tracker.update(0, evaluation(0.5, 0.5))
    assert not tracker.should_stop
    tracker.update(10, evaluation(0.6, 0.6))
    tracker.update(20, evaluation(0.55, 0.55))
    assert not tracker.should_stop
    tracker.update(30, evaluation(0.58, 0.58))
    assert tracker.should_stop and tracker.best_iteration == 10


def test_state_round_trip():
    tracker = BestTracker(OPTIMISED, HELD_OUT, patience=3)
    tracker.update(0, evaluation(0.5, 0.5))
    tracker.update(10, evaluation(0.7, 0.5))
    again = BestTracker.from_state(tracker.state())
    assert again == tracker
