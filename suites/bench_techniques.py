"""Every registered technique against the dense model, as in-process time ratios (the gate).

Raw asv timings of identical code moved by up to 40% between processes on this machine kind;
a ratio timed interleaved in one process moved about 3%. So the gated quantity is
``t_candidate / t_dense`` (lower is better: asv has no higher-is-better), with the speedup beside
it for reading. Models are trained briefly once per environment and commit (``setup_cache``) from
fixed seeds; the authoritative trained figures with quality are the records in ``baselines/``.
The measuring code is ``bench.gate``, which ``bk-bench calibrate`` runs the same way; the passes
per ratio (and the gate's factor) are the ones it chose, in ``baselines/gate.json``.
"""

import inspect
import os
from pathlib import Path

from bench import gate
from bench.baselines import Target
from bench.registry import REFERENCE, techniques

# asv runs this file from the working tree and the installed package from the commit measured,
# so the settings are read here, beside the suite: both commits are measured alike.
ROOT = Path(__file__).resolve().parent.parent
SETTINGS = gate.GateSettings.load(ROOT / gate.GATE_FILE)
TARGET = Target.load(ROOT / "baselines")
NAMES = [name for name in techniques() if name != REFERENCE]


def commit_bench(cache: str):
    """The measured commit's gate models, with this repository's quality budget (asv installs
    the commit as a wheel, without baselines/). Packages from before ``gate.bench`` took a
    target use their own default, so a history over older commits still measures them."""
    if "target" in inspect.signature(gate.bench).parameters:
        return gate.bench(cache, target=TARGET)
    return gate.bench(cache)


def setup_cache():
    """Train once per environment and commit (asv runs it in a fresh process and folder); every
    benchmark here loads these models, as the calibration's runs do."""
    return gate.train_all(os.path.abspath("bk-bench-models"))


setup_cache.timeout = 900


def technique_speed(cache: str, name: str):
    return gate.measure_technique(commit_bench(cache), name, SETTINGS.passes)


class Technique:
    params = NAMES
    param_names = ["technique"]
    timeout = 900

    def track_time_ratio(self, cache, name):
        return gate.time_ratio(technique_speed(cache, name))

    track_time_ratio.unit = "t_candidate / t_dense"

    def track_speedup(self, cache, name):
        return technique_speed(cache, name).speedup

    track_speedup.unit = "x (not gated: asv reads a rise as a regression)"


class Cumulative:
    """The combined model when registered, else the best technique within the quality budget."""

    timeout = 900

    def track_cumulative_time_ratio(self, cache):
        bench = commit_bench(cache)
        return gate.time_ratio(gate.measure_cumulative(bench, SETTINGS.passes))

    track_cumulative_time_ratio.unit = "t_combined / t_dense"
