"""The storage benchmark packs request headers by hand (its hot loop skips the message
classes): they must stay byte-equal to the real messages' encoding."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import storage


def test_the_storage_benchmark_packs_what_the_messages_encode() -> None:
    storage.check_header_layout(layer=3)  # SystemExit names the message that changed
