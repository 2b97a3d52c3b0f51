"""Settings for the whole test suite.

Hypothesis' per-example deadline is a wall-clock limit: on a loaded 2-core machine it fails
tests that are correct, and no test here asserts time. It is off everywhere.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("adalora", deadline=None)
settings.load_profile("adalora")
