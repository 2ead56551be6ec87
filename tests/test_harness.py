"""The harness: paired speedups, FLOPs, baseline records, the registry and the command."""

import json

import pytest
import torch

from bench import baselines
from bench.cli import main, parse_value
from bench.files import read_json, write_atomic, write_new
from bench.measure import Comparison, Speedup, Workload
from bench.registry import Knob, Technique, get, techniques
from bk.data import load_corpus
from bk.model import LanguageModel, ModelConfig, Work
from bk.train import Evaluation


def make_comparison(name="t", speedup=2.0, ppl_ref=10.0, ppl_cand=10.2) -> Comparison:
    import math

    return Comparison(name, Speedup((speedup,) * 3, 1.0, 1 / speedup), 100, 50,
                      Work(10, 10, 10), Work(5, 5, 10),
                      Evaluation("test", math.log(ppl_ref), 100),
                      Evaluation("test", math.log(ppl_cand), 100))


def test_comparison_reports_wall_flops_work_and_quality_side_by_side():
    c = make_comparison()
    assert c.wall_speedup == 2.0 and c.flops_speedup == 2.0 and c.work_ratio == 0.5
    assert c.quality_delta == pytest.approx(0.02)


def test_workload_covers_the_test_split_in_full_batches():
    corpus = load_corpus("synthetic")
    w = Workload.from_corpus(corpus, batch_size=4, seq_len=32, max_batches=3)
    assert len(w.batches) == 3 and w.tokens == 3 * 4 * 32
    model = LanguageModel(ModelConfig(vocab_size=len(corpus.vocab), n_seq=32))
    work, stats = w.account(model)
    assert work.token_layers == w.tokens * model.cfg.n_layers
    assert stats == {"mean_layers_per_token": float(model.cfg.n_layers)}


def test_a_record_is_written_once_and_never_rewritten(tmp_path):
    (tmp_path / "target.json").write_text((baselines.BASELINES / "target.json").read_text())
    target = baselines.Target.load(tmp_path)
    rec = baselines.make_record([make_comparison()], {"corpus": "x"}, target, "a" * 40)
    path = baselines.record(rec, tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never rewritten"):
        baselines.record(rec, tmp_path)
    assert path.read_bytes() == before
    assert baselines.history(tmp_path)[0]["commit"] == "a" * 40


def test_a_corrupt_record_gives_a_clear_error_and_is_left_alone(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        baselines.history(tmp_path)
    assert (folder / "bad.json").read_text() == "{not json"
    with pytest.raises(ValueError, match="does not exist"):
        baselines.Target.load(tmp_path / "nowhere")


def test_cumulative_is_one_until_a_technique_counts_and_never_a_product():
    target = baselines.Target(10.0, 0.05, 0.01, 0.1)
    rec = baselines.make_record([], {}, target, "c")
    assert rec["cumulative"] == {"speedup": 1.0, "counts": True,
                                 "source": "dense (no technique within budget is faster)"}
    rec = baselines.make_record([make_comparison("a", 2.0), make_comparison("b", 3.0, ppl_cand=12),
                                 make_comparison("c", 1.5), make_comparison("d", 0.9)], {},
                                target, "c")
    assert rec["cumulative"]["speedup"] == 2.0 and rec["cumulative"]["source"] == "a"
    over_budget = make_comparison("combined", 4.0, ppl_cand=12)
    rec = baselines.make_record([make_comparison("a", 2.0), over_budget], {}, target, "c")
    assert rec["cumulative"]["source"] == "a"
    assert rec["cumulative"]["combined"] == {"wall_speedup": 4.0, "counts": False,
                                             "quality_delta": pytest.approx(0.2)}


def test_check_flags_a_speedup_drop_beyond_tolerance_and_a_quality_budget_breach():
    target = baselines.Target(10.0, 0.05, 0.01, 0.1)
    latest = baselines.make_record([make_comparison("a", 2.0), make_comparison("b", 2.0)], {},
                                   target, "c")
    rows = baselines.check([make_comparison("a", 1.85), make_comparison("b", 2.0, ppl_cand=11)],
                           latest, target)
    assert rows[0].problem is None
    assert "quality" in rows[1].problem
    rows = baselines.check([make_comparison("a", 1.7)], latest, target)
    assert "fell" in rows[0].problem


def test_atomic_writes_replace_whole_files_and_new_files_refuse_to_overwrite(tmp_path):
    p = tmp_path / "x.json"
    write_atomic(p, '{"a": 1}')
    write_atomic(p, '{"a": 2}')
    assert read_json(p) == {"a": 2}
    write_new(tmp_path / "y", "1")
    with pytest.raises(FileExistsError):
        write_new(tmp_path / "y", "2")
    assert (tmp_path / "y").read_text() == "1"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.json", "y"]


def test_registry_lists_dense_first_and_rejects_unknown_names_and_knobs():
    assert next(iter(techniques())) == "dense"
    with pytest.raises(ValueError, match="unknown technique"):
        get("nope")
    t = Technique("t", "", lambda c, k: None, knobs=(Knob("a", 1),))
    assert t.resolve({"a": 2}) == {"a": 2}
    with pytest.raises(ValueError, match="no knob 'b'"):
        t.resolve({"b": 1})


def test_every_registered_technique_builds_and_accepts_the_dense_weights():
    config = ModelConfig(vocab_size=17, d_model=16, n_layers=4, n_seq=16, n_experts=2,
                         d_expert=16, bk_channels=2)
    dense = LanguageModel(config)
    x = torch.randint(0, 17, (2, 16))
    for name, technique in techniques().items():
        model = technique.make(config)
        assert not model.load_state_dict(dense.state_dict(), strict=False).unexpected_keys, name
        out = model.eval()(x, x)
        assert out.logits.shape == (2, 16, 17) and torch.isfinite(out.loss), name


def test_command_values_parse_to_numbers_booleans_and_strings():
    assert [parse_value(v) for v in ("3", "0.5", "true", "balanced")] == [3, 0.5, True, "balanced"]


def test_the_main_job_runs_end_to_end_and_writes_its_results(tmp_path, capsys):
    code = main(["run", "--quick", "--corpus", "synthetic", "--steps", "3", "--rounds", "2",
                 "--techniques", "dense", "--output", str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "wall speedup" in out and "cumulative speedup" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rows"][0]["technique"] == "dense"
    assert (tmp_path / "results.csv").exists() and (tmp_path / "speedups.png").stat().st_size > 0


def test_bad_options_give_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "dense", "--knob", "nonsense"])
    assert "NAME=V1,V2" in capsys.readouterr().err
    assert main(["measure", "nope", "--quick", "--corpus", "synthetic", "--steps", "0",
                 "--output", "/tmp/bk-bench-none", "--no-progress"]) == 2
    assert "unknown technique" in capsys.readouterr().err


def test_the_same_setup_trains_the_same_weights_in_separate_folders(tmp_path):
    # The asv gate trains models per commit; unseeded initial weights once made an A/A
    # comparison of ACT move by 14%.
    from bench.pipeline import Bench, Setup

    weights = []
    for folder in ("a", "b"):
        setup = Setup(corpus="synthetic", steps=5, output=tmp_path / folder, progress=False)
        weights.append(Bench(setup).candidate("sparsity").state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
