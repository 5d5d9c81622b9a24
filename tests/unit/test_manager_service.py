"""The manager service's state machine side: apply, reasons, the published view."""

from __future__ import annotations

from lamina.mgmt import clustermap as cm
from lamina.mgmt.service import ManagerService, encode_entry

GiB = 1 << 30


def apply(svc: ManagerService, cmd: cm.Command) -> tuple[bool, str | int]:
    return svc.apply_entry(cm.encode_command(cmd))


def test_clients_see_the_map_as_it_was_at_the_published_epoch() -> None:
    """The published view is the map at the published epoch, not the latest one."""
    svc = ManagerService("m1")
    assert apply(svc, cm.AddServer("s1", "127.0.0.1:1", GiB)) == (True, 1)
    assert apply(svc, cm.AddServer("s2", "127.0.0.1:2", GiB)) == (True, 2)
    assert apply(svc, cm.CreateVolume("db", GiB)) == (True, 3)
    assert svc.published is not None
    assert svc.published.epoch == 0
    assert apply(svc, cm.Publish(2)) == (True, 3)
    assert svc.published.epoch == 2
    assert svc.published.published_epoch == 2
    assert set(svc.published.servers) == {"s1", "s2"}
    assert "db" not in svc.published.volumes  # created at epoch 3, not published yet
    assert apply(svc, cm.Publish(3)) == (True, 3)
    assert "db" in svc.published.volumes
    assert svc.published == svc.map


def test_rejected_and_undecodable_entries_change_nothing() -> None:
    """A rejected command returns its reason and an undecodable entry is refused alike."""
    svc = ManagerService("m1")
    before = svc.map
    ok, reason = apply(svc, cm.RemoveServer("nope"))
    assert not ok
    assert "nope" in str(reason)
    ok, reason = svc.apply_entry(b"\xc1garbage")
    assert not ok
    assert "undecodable" in str(reason)
    assert svc.map is before


def test_a_snapshot_restores_the_map_and_knows_when_it_cannot_serve_a_published_view() -> None:
    """dump/load round-trips the map; a snapshot taken before a publication has no
    published view until the next Publish."""
    svc = ManagerService("m1")
    apply(svc, cm.AddServer("s1", "127.0.0.1:1", GiB))
    other = ManagerService("m2")
    other.load(svc.dump())
    assert other.map == svc.map
    assert other.published is None  # epoch 1 not published when the snapshot was made
    assert apply(other, cm.Publish(1)) == (True, 1)
    assert other.published == other.map


def test_deleted_volumes_leave_layers_to_reclaim_until_every_server_confirmed() -> None:
    """DeleteVolume lists its layers with the servers holding them; each confirmation
    removes one server; the list survives a snapshot."""
    svc = ManagerService("m1")
    for i in (1, 2, 3):
        apply(svc, cm.AddServer(f"s{i}", f"127.0.0.1:{i}", GiB))
    apply(svc, cm.CreateVolume("db", GiB, replicas=2, stripe=3))
    (lid,) = svc.map.volumes["db"].layers
    vid = svc.map.volumes["db"].id
    assert svc.reclaim == {}
    assert apply(svc, cm.DeleteVolume("db"))[0]
    assert svc.reclaim == {lid: (vid, ("s1", "s2", "s3"))}
    copy = ManagerService("m2")
    copy.load(svc.dump())
    assert copy.reclaim == svc.reclaim
    svc.reclaimed(lid, "s2")
    assert svc.reclaim == {lid: (vid, ("s1", "s3"))}
    svc.reclaimed(lid, "s1")
    svc.reclaimed(lid, "s3")
    assert svc.reclaim == {}
    svc.reclaimed(lid, "s3")  # a late confirmation changes nothing
    assert svc.reclaim == {}


def test_layers_created_with_other_nonces_get_other_lineage_tokens() -> None:
    """The same commands committed with other random nonces (a map rebuilt after losing
    its newest entries) give the layers they create the same ids but other lineage
    tokens; an entry without a nonce, from before them, still applies."""
    maps = []
    for nonce in (1, 2):
        svc = ManagerService("m1")
        for cmd in (cm.AddServer("s1", "127.0.0.1:1", GiB), cm.CreateVolume("db", GiB, 1, 1)):
            assert svc.apply_entry(encode_entry(cmd, nonce))[0]
        assert svc.apply_entry(encode_entry(cm.CreateSnapshot("db", "snap", 0), nonce))[0]
        maps.append(svc.map)
    first, second = maps
    assert sorted(first.layers) == sorted(second.layers) == [1, 2]
    for lid in (1, 2):
        assert first.layers[lid].lineage != second.layers[lid].lineage
        assert first.layers[lid].lineage != 0
    assert first.layers[1].lineage != first.layers[2].lineage
    assert cm.map_from_dict(cm.map_to_dict(first)) == first
    legacy = ManagerService("m1")
    assert apply(legacy, cm.AddServer("s1", "127.0.0.1:1", GiB))[0]
    assert apply(legacy, cm.CreateVolume("db", GiB, 1, 1))[0]
    assert legacy.map.layers[1].lineage == cm.layer_lineage(0, 1)
