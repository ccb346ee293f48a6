"""Shared pytest configuration: the hypothesis profiles.

=========  ============  ===================================================================
profile    max_examples  use
=========  ============  ===================================================================
default    50            every run (``HYPOTHESIS_PROFILE`` unset)
slow       300           ``HYPOTHESIS_PROFILE=slow python -m pytest ...`` (nightly, or with
                         ``-m slow``)
=========  ============  ===================================================================

Both have ``deadline=None``: one example lowers a whole network and runs onnxruntime, whose
time varies with the machine's load, not with the code under test. A test that sets its own
``@settings(max_examples=...)`` keeps it; a test that reads the profile (``settings().
max_examples``, as ``tests/test_random_cnns.py`` does) follows it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILES = {"default": 50, "slow": 300}

for _name, _examples in PROFILES.items():
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
