import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# hypothesis profiles of the property suite (tests/test_property_*.py):
# "ci" (default) keeps the suite within seconds on a 2-core machine; DAMEX_FUZZ=long
# selects the nightly-style "long" profile.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves
    pass
else:
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=_quiet,
                              derandomize=True)
    settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_quiet)
    settings.load_profile("long" if os.environ.get("DAMEX_FUZZ") == "long" else "ci")
