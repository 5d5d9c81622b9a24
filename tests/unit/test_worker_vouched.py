"""When a round that finds a partition clean proves that its recovering copy holds
every acknowledged write (lamina.mgmt.worker._vouched)."""

from __future__ import annotations

from lamina.mgmt import clustermap as cm
from lamina.mgmt.worker import _vouched

UP, RECOVERING, DOWN = cm.ServerState.UP, cm.ServerState.RECOVERING, cm.ServerState.DOWN


def _layer(filling: tuple[tuple[int, str], ...] = ()) -> cm.Layer:
    return cm.Layer(1, 1, (("s1", "s2"),), cm.LayerRole.LIVE, None, filling)


def test_another_up_copy_not_being_filled_vouches() -> None:
    assert _vouched(("s1", "s2"), "s1", {"s1": RECOVERING, "s2": UP}, _layer(), 0)
    # alone, with the copy that took writes in its absence down: no
    assert not _vouched(("s1", "s2"), "s1", {"s1": RECOVERING, "s2": DOWN}, _layer(), 0)


def test_every_copy_live_vouches_even_while_one_is_being_filled() -> None:
    """s1, the only complete copy, came back recovering while s2 is being filled: no
    write went out meanwhile (no copy could be read), so once a round found nothing
    dirty (a write s1 lost is dirty on s2, and s2 is its source), s1 may be up again;
    the fill then goes on from it.  Without this the partition never has an up copy."""
    filling = _layer(((0, "s2"),))
    assert _vouched(("s1", "s2"), "s1", {"s1": RECOVERING, "s2": UP}, filling, 0)
    assert _vouched(("s1", "s2"), "s1", {"s1": RECOVERING, "s2": RECOVERING}, filling, 0)
    # the filling copy down: no (nothing was listed of it)
    assert not _vouched(("s1", "s2"), "s1", {"s1": RECOVERING, "s2": DOWN}, filling, 0)
