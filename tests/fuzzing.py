"""Hypothesis settings shared by the fuzz tests.

CI runs a short pass with a fixed seed. For a long run, set
``PULLDOCKER_FUZZ_EXAMPLES=N``: each target then draws N examples from
random seeds.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG_RUN = os.environ.get("PULLDOCKER_FUZZ_EXAMPLES")


def fuzz_settings(short_pass: int, share: float = 1.0) -> settings:
    """Return settings for ``short_pass * share`` fixed-seed examples.

    With PULLDOCKER_FUZZ_EXAMPLES set, its value replaces ``short_pass``.
    """
    examples = int(LONG_RUN) if LONG_RUN else short_pass
    return settings(
        max_examples=max(1, int(examples * share)),
        derandomize=not LONG_RUN,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )
