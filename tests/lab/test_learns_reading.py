"""The lab's reading and its sanity rung learn their fast settings in CI (a change that breaks
learning fails here)."""

import pytest

from hkd4vlm.lab import LabConfig, run_rung


def test_recall_learns_in_a_few_hundred_steps():
    """The setup's sanity check: adjacent key-value recall, the question's key last (no answer cue)."""
    result = run_rung(LabConfig(rung="recall", layout="context-first", cue=False, steps=400, eval_every=100), log=None)
    assert result.steps_to[0.95] is not None and result.steps_to[0.95] <= 400, result.curve
    assert result.curve[0]["held_out"] < 0.7  # it starts near chance: the curve measures learning


@pytest.mark.heavy
def test_reading_learns_with_binding_and_carry_targets():
    """Reading: "Who drew the red shapes?" over the context, the question first, with what each sentence
    says supervised at its full stop and the asked colour where the answer is read (docs/lab.md, "The
    levels at equal steps": on one thread, as under make test's workers, 0.68 at step 500 and 0.99 at 750;
    without the carry target 0.81 and 0.90 at 750 and 1,000, and without either the same model stays at
    chance for 1,500 steps). Seed 0's run: the escape's step varies across seeds (seed 1 at 750, seed 3
    0.83 at 1,000, seed 2 at chance through 1,000), so this checks that seed 0's escape still happens, not
    that reading is reliable."""
    result = run_rung(
        LabConfig(
            rung="retrieve",
            hop_weight=1.0,
            binding_hops=True,
            carry_hop=True,
            steps=1000,
            eval_every=250,
            stop_at=0.95,
        ),
        log=None,
    )
    assert result.steps_to[0.9] is not None, result.curve
    assert result.curve[0]["held_out"] < 0.6  # it starts near chance (0.42)
