"""Connection handshake: version agreement and mutual HMAC-SHA256 challenge-response.

Theory of operation
-------------------
The client opens with HELLO (its version range and a fresh 32-byte nonce).  The server
answers with the version it chose, its own nonce and ``server_proof`` =
HMAC(key, "lamina-v1 server" | client nonce | server nonce), proving it holds the key.
The client checks that proof and sends AUTH with ``client_proof`` = HMAC(key, "lamina-v1
client" | server nonce | client nonce).  Different labels keep one side's proof from
being replayed as the other's; fresh nonces on both sides keep old proofs useless.  Only
after AUTH succeeds does the server accept any other operation or any payload.
"""

from __future__ import annotations

import hmac
import os
import secrets
from hashlib import sha256
from pathlib import Path

from lamina.durable import create_new
from lamina.errors import AuthFailed, LocalError
from lamina.wire.framing import PROTOCOL_VERSION

MIN_KEY_BYTES = 16
SUPPORTED_VERSIONS = (PROTOCOL_VERSION, PROTOCOL_VERSION)


class KeyFileError(LocalError):
    pass


def new_nonce() -> bytes:
    return secrets.token_bytes(32)


def server_proof(key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(key, b"lamina-v1 server" + client_nonce + server_nonce, sha256).digest()


def client_proof(key: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(key, b"lamina-v1 client" + server_nonce + client_nonce, sha256).digest()


def check_proof(expected: bytes, got: bytes) -> None:
    if not hmac.compare_digest(expected, got):
        raise AuthFailed("peer failed the cluster-key challenge")


def choose_version(min_version: int, max_version: int) -> int | None:
    """The highest version both sides speak, or None."""
    lo, hi = SUPPORTED_VERSIONS
    best = min(hi, max_version)
    return best if best >= max(lo, min_version) else None


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The cluster key from its file (hex text); clear errors for every way it is wrong."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise KeyFileError(f"key file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {p} is unreadable: {exc}") from None
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        raise KeyFileError(f"key file {p} must hold the key as hex text") from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"key in {p} has {len(key)} bytes, at least {MIN_KEY_BYTES} needed")
    return key


def write_new_key(path: str | os.PathLike[str]) -> bytes:
    """Create a fresh 32-byte key file readable by its owner only; never overwrite one."""
    key = secrets.token_bytes(32)
    create_new(Path(path), (key.hex() + "\n").encode("ascii"))  # fsynced, and its name
    return key
