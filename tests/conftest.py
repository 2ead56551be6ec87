"""Hypothesis profiles, and the CI profile's seed.

Timing never gates a test, so deadlines are off everywhere. The CI profile is reproducible yet
explores: its seed comes from the git tree of HEAD, so a commit that changes any file draws new
examples while the same tree always draws the same ones. The seed is printed in the pytest
header and beside every failing test, with the command that replays it;
``pytest --hypothesis-seed=N`` sets it by hand. The ``dev`` profile draws a fresh seed each run.
"""

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from bench.measure import timing_process

settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=50, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")
settings.load_profile(PROFILE)

timing_process()  # as every bk-bench process: records made here compare alike

ROOT = Path(__file__).resolve().parent.parent
SEED = pytest.StashKey[str]()  # what the seed is and where it came from


def tree_seed() -> tuple[int | None, str]:
    """A 32-bit seed from the hash of HEAD's git tree, and where it came from."""
    try:
        tree = subprocess.run(["git", "rev-parse", "HEAD^{tree}"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, "no git tree found; Hypothesis draws a random seed per test"
    return int(tree[:8], 16), f"from git tree {tree[:12]}"


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's plugin reads --hypothesis-seed
def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("hypothesis_seed", None)
    if seed is not None:
        source = "given with --hypothesis-seed"
    elif PROFILE == "ci":
        seed, source = tree_seed()
        if seed is not None:
            config.option.hypothesis_seed = str(seed)
    if seed is None:
        config.stash[SEED] = (f"hypothesis profile {PROFILE!r}: a random seed per test, printed "
                              "with a failure")
    else:
        config.stash[SEED] = (f"hypothesis profile {PROFILE!r}, seed {seed} ({source}); replay: "
                              f"HYPOTHESIS_PROFILE={PROFILE} pytest --hypothesis-seed={seed}")


def pytest_report_header(config: pytest.Config) -> str:
    return config.stash[SEED]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    terminalreporter.write_line(config.stash[SEED])  # also under -q, which hides the header


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if report.failed and getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        report.sections.append(("hypothesis seed", item.config.stash[SEED]))
