"""The timing harness gives the right figures: exact speedups on a fake clock, the direction of
every ratio (reference first), and the A/A row timing the dense model against itself."""

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bench import pipeline
from bench.measure import Speedup, Workload, compare, count_flops, paired_speedup, speed_figures
from bench.pipeline import Bench, Setup
from bench.rows import Row
from bench.run import measure_all
from bk.data import load_corpus
from bk.train import evaluate
from tests.strategies import TINY, FakeClock, Timed, float64_model


def test_speedup_is_the_median_of_per_round_ratios_with_its_quartiles():
    s = Speedup(ratios=(1.0, 2.0, 4.0, 3.0, 5.0), t_reference=1.0, t_candidate=0.5)
    assert s.speedup == 3.0 and s.q1 == 2.0 and s.q3 == 4.0 and s.rounds == 5
    assert s.warning is not None and "noisy" in s.warning
    assert Speedup((1.0, 1.01, 0.99), 1.0, 1.0).warning is None


def test_a_speedup_is_noisy_exactly_when_its_relative_spread_passes_ten_percent():
    """Spreads of 9% and 11% either side of the limit: the flag, and the spread it names."""
    quiet, noisy = Speedup((0.91, 1.0, 1.09), 1.0, 1.0), Speedup((0.89, 1.0, 1.11), 1.0, 1.0)
    assert quiet.spread == pytest.approx(0.09) and quiet.warning is None
    assert noisy.spread == pytest.approx(0.11) and "spread 11% of the median" in noisy.warning


def test_a_reference_three_times_as_slow_as_the_candidate_is_a_speedup_of_exactly_three():
    clock = FakeClock()
    s = paired_speedup(clock.costing("r", 3.0), clock.costing("c", 1.0), rounds=5, clock=clock)
    assert s.ratios == (3.0,) * 5 and s.speedup == 3.0 and s.q1 == s.q3 == 3.0
    assert (s.t_reference, s.t_candidate, s.rounds, s.spread, s.warning) == (3.0, 1.0, 5, 0.0,
                                                                             None)
    backwards = paired_speedup(clock.costing("c", 1.0), clock.costing("r", 3.0), rounds=5,
                               clock=clock)
    assert backwards.speedup == 1 / 3 and backwards.t_reference == 1.0


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
           st.lists(st.integers(1, 1000), min_size=n, max_size=n),
           st.lists(st.integers(1, 1000), min_size=n, max_size=n))),
       st.integers(0, 3))
@example(([2, 4, 6, 8, 10], [1, 1, 1, 1, 1]), 1)
@example(([3, 3, 3, 3], [1, 2, 4, 8]), 0)
def test_every_figure_is_the_per_round_statistic_of_the_exact_timings(costs, warmup):
    ref_costs, cand_costs = costs
    clock = FakeClock()
    # warm-up calls cost 10**6 and must not enter any figure
    s = paired_speedup(clock.costing("r", [10**6] * warmup + ref_costs),
                       clock.costing("c", [10**6] * warmup + cand_costs),
                       rounds=len(ref_costs), warmup=warmup, clock=clock)
    ratios = [r / c for r, c in zip(ref_costs, cand_costs, strict=True)]
    assert s.ratios == tuple(ratios)
    assert s.speedup == statistics.median(ratios)
    assert s.q1 == pytest.approx(float(np.quantile(ratios, 0.25)), rel=1e-12)
    assert s.q3 == pytest.approx(float(np.quantile(ratios, 0.75)), rel=1e-12)
    assert s.t_reference == statistics.median(ref_costs)
    assert s.t_candidate == statistics.median(cand_costs)
    assert s.rounds == len(ref_costs)


def test_paired_timing_warms_up_then_alternates_which_side_goes_first():
    clock = FakeClock()
    s = paired_speedup(clock.costing("r", 2.0), clock.costing("c", 1.0), rounds=5, warmup=2,
                       clock=clock)
    assert clock.log == ["r", "c", "r", "c",  # warm-up, reference first
                         "r", "c", "c", "r", "r", "c", "c", "r", "r", "c"]
    assert s.rounds == 5 and s.speedup == 2.0


def test_each_timing_is_the_mean_over_number_calls():
    clock = FakeClock()
    s = paired_speedup(clock.costing("r", [1.0, 5.0, 2.0, 4.0]), clock.costing("c", 1.0),
                       rounds=2, warmup=0, number=2, clock=clock)
    assert clock.log == ["r", "r", "c", "c", "c", "c", "r", "r"]
    assert s.ratios == (3.0, 3.0) and s.t_reference == 3.0 and s.t_candidate == 1.0


def test_paired_timing_runs_on_the_requested_threads_and_restores_them():
    before = torch.get_num_threads()
    seen = []
    paired_speedup(lambda: seen.append(torch.get_num_threads()), lambda: None, rounds=2,
                   threads=1)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before


def test_paired_timing_cycles_through_paired_batches_on_both_sides():
    clock = FakeClock()
    refs = [clock.costing(f"r{i}", 3.0 * (i + 1)) for i in range(3)]
    cands = [clock.costing(f"c{i}", 1.0 * (i + 1)) for i in range(3)]
    s = paired_speedup(refs, cands, rounds=4, warmup=0, clock=clock)
    assert clock.log == ["r0", "c0", "c1", "r1", "r2", "c2", "c0", "r0"]
    assert s.ratios == (3.0,) * 4 and s.t_reference == 4.5 and s.t_candidate == 1.5
    with pytest.raises(ValueError, match="as many"):
        paired_speedup(refs, cands[:2])


def test_paired_timing_rejects_nonsense_settings():
    with pytest.raises(ValueError, match="rounds"):
        paired_speedup(lambda: None, lambda: None, rounds=0)
    with pytest.raises(ValueError, match="warmup"):
        paired_speedup(lambda: None, lambda: None, warmup=-1)


def test_flops_come_from_torch_flop_counter():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def workload_of(batches: int = 2) -> Workload:
    return Workload("tiny", [torch.randint(0, TINY.vocab_size, (2, TINY.n_seq),
                                           generator=torch.Generator().manual_seed(i))
                             for i in range(batches)])


def test_workload_pairs_time_the_reference_first_argument_batch_by_batch():
    clock = FakeClock()
    workload = workload_of(2)
    slow, fast = (Timed(float64_model(0), clock, cost) for cost in (3.0, 1.0))
    s = workload.paired(slow, fast, passes=3, clock=clock)
    assert s.rounds == 6 and s.ratios == (3.0,) * 6 and s.speedup == 3.0
    assert workload.paired(fast, slow, passes=1, clock=clock).speedup == 1 / 3


def test_a_rows_wall_figures_are_the_speedups_median_its_quartiles_in_order_and_its_times():
    s = Speedup((1.0, 2.0, 4.0, 3.0, 5.0), t_reference=0.3, t_candidate=0.1)
    assert speed_figures(s) == {"wall_speedup": 3.0, "wall_q1": 2.0, "wall_q3": 4.0,
                                "rounds": 5, "noise_warning": s.warning, "t_reference_s": 0.3,
                                "t_candidate_s": 0.1}


def test_compare_reports_every_figure_of_the_candidate_against_the_reference():
    clock = FakeClock()
    corpus = load_corpus("synthetic")
    config = replace(TINY, vocab_size=len(corpus.vocab))
    deep, shallow = float64_model(0, config=config), float64_model(1, config=replace(config,
                                                                                    n_layers=1))
    reference, candidate = Timed(deep, clock, 3.0), Timed(shallow, clock, 1.0)
    workload = Workload.from_corpus(corpus, batch_size=2, seq_len=config.n_seq, max_batches=3)
    c = compare("shallow", reference, candidate, workload, scale="tiny", knobs={"k": 1},
                corpus=corpus, rounds=2, flop_batches=1, quality_batches=2, clock=clock)
    assert (c.technique, c.scale, c.knobs) == ("shallow", "tiny", {"k": 1})
    assert c.wall_speedup == c.wall_q1 == c.wall_q3 == 3.0 and c.rounds == 6
    assert (c.t_reference_s, c.t_candidate_s) == (3.0, 1.0) and c.noise_warning is None
    flops = [count_flops(lambda m=m: m(workload.batches[0])) for m in (deep, shallow)]
    assert flops[0] > flops[1] and c.flops_speedup == flops[0] / flops[1]
    work = [workload.account(m)[0] for m in (deep, shallow)]
    assert work[1].token_layers == c.token_layers == workload.tokens * 1
    assert c.work_ratio == work[1].flops(config) / work[0].flops(config)
    assert c.work_ratio == pytest.approx(1 / 3, rel=1e-12)  # one layer of three runs
    assert c.stats == {"mean_layers_per_token": 1.0}
    quality = [evaluate(m, corpus, "test", max_batches=2) for m in (deep, shallow)]
    assert (c.reference_perplexity, c.candidate_perplexity) == tuple(
        q.perplexity for q in quality)
    assert c.quality_delta == quality[1].perplexity / quality[0].perplexity - 1
    assert c.counts is None  # no budget was given to judge it by


def test_the_a_a_row_times_the_dense_model_against_itself_and_techniques_against_theirs(
        tmp_path, monkeypatch):
    timed = []

    def recording_compare(name, reference, candidate, workload, **kwargs):
        timed.append((name, reference, candidate))
        return Row(name, kwargs["scale"], 1.0)

    monkeypatch.setattr(pipeline, "compare", recording_compare)
    bench = Bench(Setup(corpus="synthetic", steps=2, output=tmp_path, progress=False,
                        quality_batches=1))
    rows = measure_all(bench, ["dense", "sparsity"])
    assert [r.technique for r in rows] == ["dense", "sparsity"]
    (_, a_reference, a_candidate), (_, reference, candidate) = timed
    assert a_reference is a_candidate is bench.dense()
    assert reference is bench.reference("sparsity") and candidate is bench.candidate("sparsity")
    assert reference is not bench.dense() and candidate is not reference
    assert rows[1].reference_perplexity == bench.quality(reference).perplexity
    assert rows[1].candidate_perplexity == bench.quality(candidate).perplexity


def test_counted_flops_include_the_experts_however_their_products_run():
    # torch's counter does not know torch._grouped_mm: the experts' products went uncounted and
    # every FLOPs speedup compared models whose expert work was invisible.
    model = float64_model(0)
    x = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_expert = count_flops(lambda: model(x))  # float64: one mm per expert
        grouped = count_flops(lambda: model.float()(x))  # float32: one grouped product
    experts = 2 * 2 * TINY.d_model * TINY.d_expert * x.numel() * TINY.n_layers  # up and down
    assert grouped == per_expert >= experts


_FAULTS_PER_FORWARD = """
import resource, sys, torch
from bench.measure import keep_freed_memory
from bk.model import LanguageModel, ModelConfig
torch.set_num_threads(1)
kept = sys.argv[1] == "kept" and keep_freed_memory()
torch.manual_seed(0)
net, idx = LanguageModel(ModelConfig()).eval(), torch.randint(0, 128, (32, 128))
faults = []
with torch.no_grad():
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(idx)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults[4:])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_with_freed_memory_kept_a_warm_dense_forward_faults_no_page_in_again():
    """The default allocator faults pages of the forward's temporaries in again and again
    (thousands over twenty tiny forwards here); with the policy, a warm forward reuses its
    memory (a block of new pages now and then as the heap settles: the median is ~0). Twenty
    forwards, not eight: the heap's blocks of new pages come in short runs (1 MB in four
    forwards of eight was seen once in CI), which a median of eight can mistake for the rule."""
    def faults(policy: str) -> tuple[str, list[int]]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_FORWARD, policy], check=True,
                             capture_output=True, text=True, env={**os.environ,
                                                                  "OMP_NUM_THREADS": "1"})
        kept, *counts = out.stdout.split()
        return kept, [int(c) for c in counts]

    kept, counts = faults("kept")
    assert kept == "True" and statistics.median(counts) <= 10, counts
    kept, counts = faults("default")
    assert kept == "False" and sum(counts) > 1000, counts
