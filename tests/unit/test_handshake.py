"""Handshake proofs, version choice and cluster key files."""

from __future__ import annotations

import hmac
import os
import stat
from hashlib import sha256
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import AuthFailed, LaminaError
from lamina.wire import handshake as hs
from lamina.wire.framing import PROTOCOL_VERSION

keys = st.binary(min_size=hs.MIN_KEY_BYTES, max_size=64)
nonces = st.binary(min_size=32, max_size=32)


@given(keys, nonces, nonces)
def test_proofs_with_the_right_key_verify(key: bytes, client: bytes, server: bytes) -> None:
    """Proofs recomputed with the same key and nonces pass check_proof."""
    hs.check_proof(hs.server_proof(key, client, server), hs.server_proof(key, client, server))
    hs.check_proof(hs.client_proof(key, server, client), hs.client_proof(key, server, client))


def test_proofs_are_hmac_sha256_of_label_and_nonces() -> None:
    """The proofs are HMAC-SHA256 over a side label followed by the two nonces."""
    key, client, server = b"k" * 32, b"c" * 32, b"s" * 32
    assert hs.server_proof(key, client, server) == (
        hmac.new(key, b"lamina-v1 server" + client + server, sha256).digest()
    )
    assert hs.client_proof(key, server, client) == (
        hmac.new(key, b"lamina-v1 client" + server + client, sha256).digest()
    )
    assert len(hs.new_nonce()) == 32
    assert hs.new_nonce() != hs.new_nonce()


@given(keys, keys, nonces, nonces)
def test_proofs_with_a_wrong_key_fail(
    key: bytes, other: bytes, client: bytes, server: bytes
) -> None:
    """A proof made with another key fails check_proof with AuthFailed."""
    if key == other:
        return
    with pytest.raises(AuthFailed):
        hs.check_proof(hs.server_proof(key, client, server), hs.server_proof(other, client, server))
    with pytest.raises(AuthFailed):
        hs.check_proof(hs.client_proof(key, server, client), hs.client_proof(other, server, client))


@given(keys, nonces, nonces)
def test_server_proof_is_not_a_client_proof(key: bytes, client: bytes, server: bytes) -> None:
    """A server's proof replayed as the client's proof (even with nonces swapped) fails."""
    expected = hs.client_proof(key, server, client)
    for replay in (hs.server_proof(key, client, server), hs.server_proof(key, server, client)):
        with pytest.raises(AuthFailed):
            hs.check_proof(expected, replay)


@given(keys, nonces, nonces, nonces)
def test_proof_for_other_nonces_fails(key: bytes, client: bytes, server: bytes, old: bytes) -> None:
    """A proof recorded for an earlier server nonce fails against a fresh one."""
    if old == server:
        return
    with pytest.raises(AuthFailed):
        hs.check_proof(hs.client_proof(key, server, client), hs.client_proof(key, old, client))


@pytest.mark.parametrize("got", [b"", b"x", bytes(31), bytes(33)])
def test_proof_of_wrong_length_fails(got: bytes) -> None:
    """A proof of the wrong length fails with AuthFailed rather than any other error."""
    with pytest.raises(AuthFailed):
        hs.check_proof(bytes(32), got)


def test_choose_version_examples() -> None:
    """choose_version picks the highest common version or None when the ranges are disjoint."""
    assert hs.SUPPORTED_VERSIONS == (PROTOCOL_VERSION, PROTOCOL_VERSION)
    assert hs.choose_version(1, 1) == 1
    assert hs.choose_version(0, 255) == 1
    assert hs.choose_version(1, 9) == 1
    assert hs.choose_version(2, 3) is None
    assert hs.choose_version(0, 0) is None
    assert hs.choose_version(5, 1) is None


@given(st.integers(0, 255), st.integers(0, 255))
def test_choose_version_is_the_highest_common(lo: int, hi: int) -> None:
    """The chosen version lies in both ranges and is the highest such; None iff there is none."""
    mine = range(hs.SUPPORTED_VERSIONS[0], hs.SUPPORTED_VERSIONS[1] + 1)
    common = [v for v in mine if lo <= v <= hi]
    assert hs.choose_version(lo, hi) == (max(common) if common else None)


# --- key files ---------------------------------------------------------------------------


def test_load_key_reads_hex_with_whitespace(tmp_path: Path) -> None:
    """A key file of hex text (surrounding whitespace allowed) loads as bytes."""
    key = bytes(range(32))
    path = tmp_path / "key"
    path.write_text(f"  {key.hex()}\n\n")
    assert hs.load_key(path) == key
    assert hs.load_key(str(path)) == key


def _key_error(path: Path) -> str:
    with pytest.raises(hs.KeyFileError) as info:
        hs.load_key(path)
    assert isinstance(info.value, LaminaError)
    return info.value.message


def test_missing_key_file_is_reported(tmp_path: Path) -> None:
    """A missing key file raises KeyFileError saying it does not exist."""
    path = tmp_path / "absent"
    assert _key_error(path) == f"key file {path} does not exist"


@pytest.mark.parametrize("text", ["not hex at all", "abc", "zz" * 32, "0x" + "ab" * 32])
def test_non_hex_key_file_is_reported(tmp_path: Path, text: str) -> None:
    """A key file that is not hex text raises KeyFileError saying so."""
    path = tmp_path / "key"
    path.write_text(text)
    assert _key_error(path) == f"key file {path} must hold the key as hex text"


@pytest.mark.parametrize("size", [0, 1, hs.MIN_KEY_BYTES - 1])
def test_short_key_is_reported(tmp_path: Path, size: int) -> None:
    """A key shorter than MIN_KEY_BYTES raises KeyFileError naming both lengths."""
    path = tmp_path / "key"
    path.write_text(bytes(size).hex())
    message = _key_error(path)
    assert f"has {size} bytes" in message
    assert f"at least {hs.MIN_KEY_BYTES}" in message


def test_unreadable_key_file_is_reported(tmp_path: Path) -> None:
    """A key path that cannot be read as ASCII text raises KeyFileError."""
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" * 20)
    assert "unreadable" in _key_error(binary)
    assert "unreadable" in _key_error(tmp_path)  # a directory


def test_write_new_key_creates_an_owner_only_file(tmp_path: Path) -> None:
    """write_new_key writes a fresh 32-byte hex key into a 0600 file that load_key reads."""
    path = tmp_path / "cluster.key"
    key = hs.write_new_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert hs.load_key(path) == key
    assert hs.write_new_key(tmp_path / "other.key") != key


def test_write_new_key_refuses_to_overwrite(tmp_path: Path) -> None:
    """write_new_key refuses an existing path and leaves its content untouched."""
    path = tmp_path / "cluster.key"
    path.write_text("keep me\n")
    with pytest.raises(FileExistsError):
        hs.write_new_key(path)
    assert path.read_text() == "keep me\n"
