"""Ceilings (bench/ceilings.py) of a fake technique whose work and costs are known exactly, and
the `bk-bench ceilings` command on the real techniques."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bench.ceilings import (
    flops_ratio,
    makes_decisions,
    matching_keep,
    measure_ceiling,
    realised_ceilings,
)
from bench.cli import main
from bench.measure import Workload
from bench.rows import PATTERNS, Row
from bk.model import LanguageModel, Work
from bk.technique import Forcing, TechniqueModel
from tests.strategies import TINY, FakeClock, Timed

DENSE, FIXED, DECIDING = 1.0, 0.1, 0.3  # seconds per forward pass on the fake clock
N = TINY.n_seq


class FakeSkip(TechniqueModel):
    """A technique of known costs: forced at keep ``k``, the first ``ceil(k N)`` tokens of every
    sequence run every layer's work (a fraction ``f`` of it), and a forward pass costs ``FIXED
    + f DENSE``; deciding (unforced, at its trained rate) costs ``DECIDING`` more."""

    def __init__(self, cfg, clock, keep=0.5, forced_path=False):
        super().__init__(cfg)
        self.clock, self.keep, self.forced_path = clock, keep, forced_path

    def forward(self, idx, targets=None):
        out = super().forward(idx, targets)
        b, n = idx.shape
        fraction = math.ceil(self.keep * n) / n
        ran = b * math.ceil(self.keep * n) * self.cfg.n_layers
        self.clock.advance(FIXED + fraction * DENSE + (0 if self.forced_path else DECIDING))
        return replace(out, work=Work(ran, ran, ran))

    def forced(self, forcing):
        twin = copy.copy(self)
        twin.keep, twin.forced_path = forcing.keep, True
        return twin


def fake_setup():
    """A fake clock, the dense model costing ``DENSE`` on it, the fake technique, a workload."""
    clock = FakeClock()
    torch.manual_seed(0)
    dense = Timed(LanguageModel(TINY).eval(), clock, DENSE)
    workload = Workload("w", [torch.randint(TINY.vocab_size, (2, N),
                                            generator=torch.Generator().manual_seed(i))
                              for i in range(2)])
    return clock, dense, FakeSkip(TINY, clock).eval(), workload


@given(j=st.integers(1, N), pattern=st.sampled_from(PATTERNS))
def test_a_forced_fake_runs_exactly_its_keep_and_its_ceiling_is_its_known_cost(j, pattern):
    clock, dense, model, workload = fake_setup()
    keep = j / N
    c = measure_ceiling("fake", "tiny", dense, model, Forcing(keep, pattern), workload, TINY,
                        passes=2, clock=clock)
    assert c.work_ratio == keep and c.ideal == 1 / keep  # ceil(keep N) = j tokens of N run
    assert c.ran("token_layers") == c.ran("positions") == c.ran("expert_calls") == keep
    assert c.speed.speedup == pytest.approx(DENSE / (FIXED + keep * DENSE), rel=1e-12)
    assert c.overhead == pytest.approx(1 - keep / (FIXED + keep * DENSE), rel=1e-9)
    assert c.speed.rounds == 2 * len(workload.batches)


def test_a_model_that_makes_no_decisions_has_no_ceiling():
    clock, dense, _, workload = fake_setup()
    plain = TechniqueModel(TINY).eval()  # forced() is None: it decides nothing
    assert not makes_decisions(plain) and not makes_decisions(dense)
    assert measure_ceiling("plain", "tiny", dense, plain, Forcing(0.5), workload, TINY) is None


@given(target=st.floats(0.01, 1.0) | st.integers(1, N).map(lambda j: j / N))
@example(target=0.5)  # exactly reachable: the rate that runs it, not one above
def test_the_matched_keep_is_the_smallest_rate_that_runs_the_target_work(target):
    _, dense, model, workload = fake_setup()
    keep = matching_keep(model, dense, "uniform", target, workload, TINY)

    def ratio(k):
        return flops_ratio(model.forced(Forcing(k)), dense, workload, TINY)

    assert ratio(keep) >= target
    assert keep <= 2**-10 or ratio(keep - 2**-10) < target


def test_a_trained_row_gets_its_ceilings_at_the_work_it_really_ran():
    clock, dense, model, workload = fake_setup()
    realised = DENSE / (FIXED + 0.5 * DENSE + DECIDING)  # the model decides at keep 0.5
    row = Row("fake", "tiny", realised, work_ratio=0.5)
    figures = realised_ceilings(model, dense, row, workload, passes=1, clock=clock)
    assert figures["decisions"] == "learned"
    ceiling = DENSE / (FIXED + 0.5 * DENSE)  # the same work with its decisions free
    for pattern in PATTERNS:
        assert 0.5 - 1 / N < figures[f"keep_{pattern}"] <= 0.5  # runs ceil(keep N) = N/2
        assert figures[f"ceiling_{pattern}"] == pytest.approx(ceiling, rel=1e-12)
    row = replace(row, **figures)
    assert row.decision_cost("uniform") == pytest.approx(1 - realised / ceiling, rel=1e-9)
    assert row.overhead("uniform") == pytest.approx(1 - ceiling / 2, rel=1e-9)


def test_a_model_that_makes_no_decisions_has_its_realised_speedup_as_its_ceiling():
    clock, dense, _, workload = fake_setup()
    row = Row("multiscale", "tiny", 1.7, work_ratio=0.5)
    figures = realised_ceilings(TechniqueModel(TINY), dense, row, workload, clock=clock)
    assert figures == {"decisions": "none", "ceiling_uniform": 1.7, "ceiling_per_token": 1.7}
    assert replace(row, **figures).decision_cost("per_token") == 0


def test_the_ceilings_command_writes_every_deciding_technique_in_both_patterns(tmp_path,
                                                                                capsys):
    argv = ["ceilings", "--scale", "tiny", "--techniques", "mod", "multiscale", "--batches", "1",
            "--batch-size", "2", "--seq-len", "16", "--passes", "1", "--output", str(tmp_path),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ceiling" in out and "written:" in out
    rows = json.loads((tmp_path / "ceilings.json").read_text())
    assert [(r["technique"], r["pattern"], r["scale"], r["keep"]) for r in rows] == [
        ("mod", "uniform", "tiny", 0.5), ("mod", "per_token", "tiny", 0.5)]  # multiscale: none
    assert all(0 < r["work_ratio"] < 1 and r["ceiling"] > 0 for r in rows)
    assert (tmp_path / "ceilings.csv").read_text().startswith("technique,scale,pattern")


@pytest.mark.parametrize("argv", [["--keep", "0"], ["--keep", "1.5"], ["--scale", "huge"],
                                  ["--techniques", "dense"]])
def test_bad_ceilings_options_exit_2_with_one_line(tmp_path, capsys, argv):
    try:
        code = main(["ceilings", *argv, "--output", str(tmp_path)])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1
