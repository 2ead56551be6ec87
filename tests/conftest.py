import os

import torch
from hypothesis import HealthCheck, settings

# Timing never gates a test (principle 4), so deadlines are off everywhere. The CI profile is
# derandomised so a red run reproduces, and bounded so tox stays within its budget.
settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=20, derandomize=True,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(1)
