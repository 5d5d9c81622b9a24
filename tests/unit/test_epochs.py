"""The epoch comparator (lamina.storage.epochs.compare)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lamina.storage.epochs import Verdict, compare

epochs = st.integers(min_value=0, max_value=(1 << 64) - 1)


@st.composite
def server_and_fence(draw: st.DrawFn) -> tuple[int, int]:
    """A server epoch and a volume fence epoch that is not above it."""
    server = draw(epochs)
    fence = draw(st.integers(min_value=0, max_value=server))
    return server, fence


@given(request=epochs, server=epochs, fence=epochs)
def test_no_lease_wins_over_every_epoch(request: int, server: int, fence: int) -> None:
    """Without a valid lease the verdict is NO_LEASE whatever the epochs are."""
    assert compare(request, server, fence, lease_valid=False) is Verdict.NO_LEASE


@given(sf=server_and_fence(), data=st.data())
def test_below_fence_is_stale(sf: tuple[int, int], data: st.DataObject) -> None:
    """A request epoch below the volume's fence is STALE."""
    server, fence = sf
    assume(fence > 0)
    request = data.draw(st.integers(min_value=0, max_value=fence - 1))
    assert compare(request, server, fence, lease_valid=True) is Verdict.STALE


@given(sf=server_and_fence(), data=st.data())
def test_above_server_epoch_is_ahead(sf: tuple[int, int], data: st.DataObject) -> None:
    """A request epoch above the server's epoch is AHEAD (the server must catch up)."""
    server, fence = sf
    assume(server < (1 << 64) - 1)
    request = data.draw(st.integers(min_value=server + 1, max_value=(1 << 64) - 1))
    assert compare(request, server, fence, lease_valid=True) is Verdict.AHEAD


@given(sf=server_and_fence(), data=st.data())
def test_between_fence_and_server_epoch_is_ok(sf: tuple[int, int], data: st.DataObject) -> None:
    """A request epoch in [fence, server epoch] is OK."""
    server, fence = sf
    request = data.draw(st.integers(min_value=fence, max_value=server))
    assert compare(request, server, fence, lease_valid=True) is Verdict.OK


@given(sf=server_and_fence(), request=epochs)
def test_verdict_partitions_the_epoch_line(sf: tuple[int, int], request: int) -> None:
    """With a lease, exactly the interval rule decides: STALE < fence <= OK <= server < AHEAD."""
    server, fence = sf
    verdict = compare(request, server, fence, lease_valid=True)
    assert verdict is not Verdict.NO_LEASE
    assert (verdict is Verdict.STALE) == (request < fence)
    assert (verdict is Verdict.AHEAD) == (request > server)
    assert (verdict is Verdict.OK) == (fence <= request <= server)


@pytest.mark.parametrize(
    ("request_epoch", "expected"),
    [
        (0, Verdict.STALE),
        (4, Verdict.STALE),
        (5, Verdict.OK),
        (7, Verdict.OK),
        (9, Verdict.OK),
        (10, Verdict.AHEAD),
        (1 << 63, Verdict.AHEAD),
    ],
)
def test_boundaries(request_epoch: int, expected: Verdict) -> None:
    """The fence and the server epoch themselves are accepted; one beyond either is not."""
    assert compare(request_epoch, 9, 5, lease_valid=True) is expected
    assert compare(request_epoch, 9, 5, lease_valid=False) is Verdict.NO_LEASE
