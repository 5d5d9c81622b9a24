"""Test-wide settings.

Under CI (the environment variable CI is set) hypothesis runs derandomized, so a red run
can be replayed exactly; elsewhere it explores new examples on every run.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
