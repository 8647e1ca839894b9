"""Hypothesis profiles of the fuzz targets, picked by `HYPOTHESIS_PROFILE`:

- `fuzz-short` (the default): 150 examples a target, the short run `make test` makes;
- `fuzz`: `FUZZ_EXAMPLES` (20,000) examples a target, and the decoders' targets too (`make fuzz`).

A profile named in the environment is also loaded for every other hypothesis test of the run; unset, nothing
outside tests/fuzz changes.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("fuzz-short", max_examples=150, deadline=None)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
    deadline=None,
    # the targets that serve HTTP or load files take a millisecond or two an example, which is their point
    suppress_health_check=[HealthCheck.too_slow],
)

if "HYPOTHESIS_PROFILE" in os.environ:
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
