"""Seeded simulation of replicated writes under faults (see tests/sim/engine.py).

LAMINA_SIM_SEEDS picks the seeds: "1-40" (a range), "123" or "5,9,12".
"""

from __future__ import annotations

import os

import pytest

from tests.sim.engine import run

STEPS = 2000


def _seeds() -> list[int]:
    spec = os.environ.get("LAMINA_SIM_SEEDS", "1-20")
    seeds: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("seed", _seeds())
def test_seed(seed: int, replicas: int) -> None:
    report = run(seed, STEPS, replicas)
    assert report.writes > 0
    assert report.reads > 0


def test_same_seed_same_trace() -> None:
    assert run(7, 500).digest == run(7, 500).digest
    assert run(7, 500).digest != run(8, 500).digest


def _first_failure(broken: str) -> tuple[int, str] | None:
    for seed in range(1, 51):
        try:
            run(seed, STEPS, 2, broken=broken)
        except AssertionError as exc:
            return seed, str(exc)
    return None


@pytest.mark.parametrize(
    "broken",
    [
        "no_clear_mask",
        "no_generation_check",
        "overwrite_writing",
        "confirm_before_flush",
        "resync_without_fua",
        "no_fail_stop",
    ],
)
def test_the_checker_catches_a_broken_protocol(broken: str) -> None:
    found = _first_failure(broken)
    assert found is not None, f"no seed in 1..50 found the {broken} protocol broken"
    seed, message = found
    assert message.startswith(f"simulation seed={seed} steps={STEPS}:")


# Losses the simulation finds in the repair decisions themselves (not in a weakened
# protocol), see docs/testing.md: when no copy of a partition is up and every copy is
# live, any live copy may be the source, and copies that disown each other fall back to
# partition order, which may pick the copy that missed acknowledged writes.
@pytest.mark.xfail(raises=AssertionError, strict=True, reason="all restarted: source by order")
@pytest.mark.parametrize("seed", [39])
def test_every_copy_restarted_after_a_power_cut(seed: int) -> None:
    run(seed, STEPS, 3)


def test_the_checker_catches_a_copy_placed_back_with_its_old_data() -> None:
    """``keep_old_copy``: a server a re-replication retired keeps its old pages, so when
    a copy is placed on it again the fill skips them.  Found on a seed the protocol
    itself passes (with re-replication many seeds do not settle today, see below)."""
    found = None
    for seed in range(1, 51):
        try:
            run(seed, STEPS, 2, broken="keep_old_copy", rereplicate=True)
        except AssertionError as exc:
            try:
                run(seed, STEPS, 2, rereplicate=True)
            except AssertionError:
                continue  # fails without the weakening too: proves nothing
            found = seed, str(exc)
            break
    assert found is not None, "no seed in 1..50 found the keep_old_copy protocol broken"
    seed, message = found
    assert message.startswith(f"simulation seed={seed} steps={STEPS}:")


# The only full copy of a partition comes back `recovering` while the other copy is
# being filled: the fill has no trusted source and the recovering copy can never be
# vouched for, so the partition never has an up copy again (18); once that copy is down
# long enough, it moves too and every copy of the partition is filling (1).
@pytest.mark.xfail(raises=AssertionError, strict=True, reason="fill without a source")
@pytest.mark.parametrize("seed", [1, 18])
def test_the_only_full_copy_recovers_while_the_other_fills(seed: int) -> None:
    run(seed, STEPS, 2, rereplicate=True)


@pytest.mark.xfail(raises=AssertionError, strict=True, reason="both recovering: source by order")
def test_the_only_up_copy_restarts_while_the_other_recovers() -> None:
    run(1, STEPS, 2, overlap=True)


# The model manager never declares the last up copy of a partition down; leader.py
# declares any server down once its lease is over.  Without the guard, network cuts
# alone lose acknowledged writes: the copy that took them alone is cut off too, both
# come back recovering, and the source is picked by partition order.
@pytest.mark.xfail(raises=AssertionError, strict=True, reason="both recovering: source by order")
def test_the_last_up_copy_declared_down_as_the_leader_does() -> None:
    run(3, STEPS, 2, last_up_guard=False)
