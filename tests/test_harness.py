"""The harness: paired speedups, FLOPs, baseline records, the registry, the command, and the
trust in its own outputs: cached models keyed by everything that determines them and checked
on loading, results written whole, clear one-line errors with documented exit codes."""

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import baselines, pipeline
from bench.cli import build_parser, main, parse_value, setup_from
from bench.files import (
    dump_json,
    figure_writer,
    locked,
    publish,
    read_json,
    write_atomic,
    write_new,
)
from bench.measure import Workload
from bench.pipeline import Bench, Setup
from bench.registry import get, techniques
from bench.rows import Row, RowError
from bk.atomic import HOST
from bk.data import load_corpus
from bk.model import LanguageModel, ModelConfig
from bk.train import content_digest, load_checkpoint, load_model, save_checkpoint
from tests.strategies import TINY_4_LAYERS


def make_row(name="t", speedup=2.0, ppl_ref=10.0, ppl_cand=10.2, scale="tiny") -> Row:
    """A measured row, counted against a 5% budget."""
    delta = ppl_cand / ppl_ref - 1
    return Row(name, scale, speedup, wall_q1=speedup, wall_q3=speedup, rounds=3,
               t_reference_s=1.0, t_candidate_s=1 / speedup, flops_speedup=2.0, work_ratio=0.5,
               reference_perplexity=ppl_ref, candidate_perplexity=ppl_cand, quality_delta=delta,
               counts=delta <= 0.05)


def test_workload_covers_the_test_split_in_full_batches():
    corpus = load_corpus("synthetic")
    w = Workload.from_corpus(corpus, batch_size=4, seq_len=32, max_batches=3)
    assert len(w.batches) == 3 and w.tokens == 3 * 4 * 32
    model = LanguageModel(ModelConfig(vocab_size=len(corpus.vocab), n_seq=32))
    work, stats = w.account(model)
    assert work.token_layers == w.tokens * model.cfg.n_layers
    assert stats == {"mean_layers_per_token": float(model.cfg.n_layers)}


def test_a_record_is_never_rewritten_and_two_recordings_of_one_commit_both_survive(tmp_path):
    # Two `baseline record` runs finishing in the same second once collided on one file name,
    # and the second finished measurement was thrown away.
    (tmp_path / "target.json").write_text((baselines.BASELINES / "target.json").read_text())
    target = baselines.Target.load(tmp_path)
    rec = baselines.make_record([make_row()], {"corpus": "x", "scale": "tiny"}, target,
                                "a" * 40)
    first = baselines.record(rec, tmp_path)
    before = first.read_bytes()
    second = baselines.record({**rec, "cumulative": {**rec["cumulative"], "source": "b"}},
                              tmp_path)
    assert second != first and first.read_bytes() == before
    assert sorted(r["cumulative"]["source"] for r in baselines.history(tmp_path)) == ["b", "t"]
    with pytest.raises(FileExistsError, match="never rewritten"):
        write_new(first, "{}")
    assert first.read_bytes() == before


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
    tiny = {"scale": "tiny"}
    rec = baselines.make_record([], tiny, target, "c")
    assert rec["cumulative"] == {"speedup": 1.0, "counts": True,
                                 "source": "dense (no technique within budget is faster)"}
    rec = baselines.make_record([make_row("a", 2.0), make_row("b", 3.0, ppl_cand=12),
                                 make_row("c", 1.5), make_row("d", 0.9)], tiny,
                                target, "c")
    assert rec["cumulative"]["speedup"] == 2.0 and rec["cumulative"]["source"] == "a"
    over_budget = make_row("combined", 4.0, ppl_cand=12)
    rec = baselines.make_record([make_row("a", 2.0), over_budget], tiny, target, "c")
    assert rec["cumulative"]["source"] == "a"
    assert rec["cumulative"]["combined"] == {"wall_speedup": 4.0, "counts": False,
                                             "quality_delta": pytest.approx(0.2)}


def test_a_record_keeps_each_axis_row_and_refuses_one_of_another_technique_or_scale(tmp_path):
    full, without = make_row("combined", 2.0), make_row("combined", 1.5, ppl_cand=10.1)
    setup, target = {"scale": "tiny"}, baselines.Target(10.0, 0.05, 0.01, 0.1)
    rec = baselines.make_record([full], setup, target, "c" * 40, {"combined": {"depth": without}})
    stored = baselines.validate_record(json.loads(dump_json(rec)), "r")
    assert baselines.record_axes(stored) == {"combined": {"depth": without}}
    assert baselines.record_axes(baselines.make_record([full], setup, target, "c" * 40)) == {}
    for bad in (make_row("act", 1.5), make_row("combined", 1.5, scale="small")):
        wrong = json.loads(dump_json(rec))
        wrong["axes"]["combined"]["depth"] = bad.to_dict()
        with pytest.raises(ValueError, match="axes of 'combined', 'depth' off"):
            baselines.validate_record(wrong, "r")


def test_check_flags_a_speedup_drop_beyond_tolerance_and_a_quality_budget_breach():
    target = baselines.Target(10.0, 0.05, 0.01, 0.1)
    tiny = {"scale": "tiny"}
    latest = baselines.make_record([make_row("a", 2.0), make_row("b", 2.0)], tiny,
                                   target, "c")
    rows = baselines.check([make_row("a", 1.85), make_row("b", 2.0, ppl_cand=11)],
                           latest, target, setup=tiny)
    assert rows[0].problem is None
    assert "quality" in rows[1].problem
    rows = baselines.check([make_row("a", 1.7)], latest, target, setup=tiny)
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
    t = get("act")
    assert t.resolve({"act_threshold": "0.5"})["act_threshold"] == 0.5
    with pytest.raises(ValueError, match="no knob 'b'"):
        t.resolve({"b": 1})
    with pytest.raises(ValueError, match="knob act_threshold"):
        t.resolve({"act_threshold": "high"})


def test_every_registered_technique_builds_and_accepts_the_dense_weights():
    config = TINY_4_LAYERS
    dense = LanguageModel(config)
    x = torch.randint(0, config.vocab_size, (2, config.n_seq))
    for name, technique in techniques().items():
        model = technique.make(config)
        assert not model.load_state_dict(dense.state_dict(), strict=False).unexpected_keys, name
        out = model.eval()(x, x)
        assert out.logits.shape == (2, config.n_seq, config.vocab_size), name
        assert torch.isfinite(out.loss), name


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


# ----------------------------------------------------------------------------- cached models

def tiny(output, **overrides) -> Setup:
    return Setup(**{"corpus": "synthetic", "steps": 4, "batch_size": 4, "seq_len": 16,
                    "rounds": 1, "workload_batches": 1, "quality_batches": 2,
                    "output": output, "progress": False, **overrides})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The dense model and the sparsity candidate of ``tiny``, trained in a folder of their
    own: what any cache hit must equal."""
    bench = Bench(tiny(tmp_path_factory.mktemp("fresh")))
    return {"dense": bench.dense(), "sparsity": bench.candidate("sparsity"), "bench": bench}


def test_a_text_corpus_edited_in_place_trains_a_new_model_instead_of_reusing_the_old(tmp_path):
    # Keyed by the spec "text:PATH", the model of the old text was reused after an edit.
    text = tmp_path / "corpus.txt"
    text.write_text("abcab cabba " * 200)
    setup = tiny(tmp_path / "runs", corpus=f"text:{text}")
    old = Bench(setup)
    old.dense()
    text.write_text("bacca abcab " * 200)  # same alphabet, spec and size; other content
    new = Bench(setup)
    assert new.dense_plan().path != old.dense_plan().path
    alone = Bench(tiny(tmp_path / "alone", corpus=f"text:{text}")).dense()
    assert same_weights(new.dense(), alone)


def rewrite_checkpoint(path, change) -> None:
    """Apply ``change`` to a checkpoint's payload and save it with a matching content hash, as
    a stale entry written by other code or for another request would be."""
    payload = torch.load(path, weights_only=True)
    payload.pop("sha256")
    change(payload)
    payload["sha256"] = content_digest(payload)
    torch.save(payload, path)


def _nan_weight(payload):
    name = next(iter(payload["model_state"]))
    payload["model_state"][name] = torch.full_like(payload["model_state"][name], math.nan)


TAMPERING = {
    "another n_seq": lambda p: p["config"].update(n_seq=32),
    "another request": lambda p: p["meta"]["request"].update(knobs={"target_sparsity": 0.9}),
    "another technique": lambda p: p["meta"]["request"].update(model="act"),
    "fewer steps": lambda p: p.update(step=p["step"] - 1),
    "another vocabulary": lambda p: p["vocab"].update(tokens=p["vocab"]["tokens"][::-1]),
    "NaN weights": _nan_weight,
    "no request (older bk-bench)": lambda p: p["meta"].pop("request"),
    "weights of another config": lambda p: p["model_state"].update(
        {k: torch.zeros(3) for k in list(p["model_state"])[:1]}),
}


@pytest.mark.parametrize("model,tampering", [
    *(("dense", t) for t in TAMPERING),
    *(("sparsity", t) for t in ("another request", "another technique", "NaN weights"))])
def test_a_cached_checkpoint_that_does_not_match_its_request_is_trained_again_with_a_note(
        tmp_path, capsys, fresh, model, tampering):
    setup = tiny(tmp_path)
    Bench(setup).candidate(model)
    [path] = [p for p in (tmp_path / "checkpoints").glob(f"{model}-*.pt")]
    rewrite_checkpoint(path, TAMPERING[tampering])
    capsys.readouterr()
    rebuilt = Bench(setup).candidate(model)
    err = capsys.readouterr().err
    assert str(path) in err and "training it again" in err
    assert same_weights(rebuilt, fresh[model])
    assert same_weights(Bench(setup).candidate(model), fresh[model])  # the entry is whole again
    assert "training it again" not in capsys.readouterr().err


def test_a_cache_hit_is_the_model_training_produced(tmp_path, fresh):
    setup = tiny(tmp_path)
    Bench(setup).candidate("sparsity")
    loaded = Bench(setup).candidate("sparsity")
    assert same_weights(loaded, fresh["sparsity"])
    assert loaded.current_target == fresh["sparsity"].current_target  # schedule state too


DAMAGE = {
    "random bytes": lambda path: path.write_bytes(bytes(range(256)) * 8),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "cut to its first kilobyte": lambda path: path.write_bytes(path.read_bytes()[:1000]),
    "damaged weights": lambda path: _damage_weights(path),
    "a foreign object": lambda path: torch.save({"format": Setup()}, path),
    "config of the wrong type": lambda path: rewrite_checkpoint(
        path, lambda p: p.update(config=[1, 2])),
    "an unknown config field": lambda path: rewrite_checkpoint(
        path, lambda p: p["config"].update(colour="red")),
    "no step": lambda path: rewrite_checkpoint(path, lambda p: p.pop("step")),
    "a negative step": lambda path: rewrite_checkpoint(path, lambda p: p.update(step=-1)),
    "tokens that are not a vocabulary": lambda path: rewrite_checkpoint(
        path, lambda p: p["vocab"].update(tokens=["aa", "b"])),
    "NaN weights": lambda path: rewrite_checkpoint(path, _nan_weight),
}


def _damage_weights(path):
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["model_state"]))
    payload["model_state"][name] = payload["model_state"][name] + 1e-3  # hash left unchanged
    torch.save(payload, path)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    corpus = load_corpus("synthetic")
    model = LanguageModel(ModelConfig(vocab_size=len(corpus.vocab), d_model=8, n_layers=2,
                                      n_seq=8, n_experts=2, d_expert=8, bk_channels=2))
    save_checkpoint(path, model, corpus.vocab, step=3)
    return path


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_checkpoint_error_is_one_line_naming_the_file_and_the_problem(
        tmp_path, capsys, checkpoint_file, damage):
    path = tmp_path / "model.pt"
    shutil.copy(checkpoint_file, path)
    load_checkpoint(path)
    DAMAGE[damage](path)
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message and len(message) < 400
    assert "pop from empty list" not in message
    assert "PyTorch 2.6" not in message and "If you are seeing" not in message  # torch's advice
    capsys.readouterr()
    assert main(["decode", "--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bk-bench decode: error: checkpoint {path}")


def test_a_code_edit_retrains_only_the_models_whose_code_it_touches(tmp_path, monkeypatch):
    # Hashing every file of bk/ once retrained all models (about 12 minutes) on any edit.
    classes = {name: type(t.make(TINY_4_LAYERS)) for name, t in techniques().items()}

    def keys(edits: dict[str, tuple[str, str]]) -> dict[str, str]:
        def read(module: str) -> str:
            source = pipeline.read_source(module)
            if module in edits:
                old, new = edits[module]
                assert old in source, (module, old)
                source = source.replace(old, new, 1)
            return source
        return {name: pipeline.code_fingerprint(cls, read) for name, cls in classes.items()}

    before = keys({})
    assert len(set(before.values())) == len(before)
    act_edit = {"bk.adaptive.act": ("from __future__ import annotations",
                                    "from __future__ import annotations\nEDITED = 1")}
    changed = keys(act_edit)
    assert {name for name in before if changed[name] != before[name]} == {"act"}
    sparsity_edit = {"bk.adaptive.sparsity": ("from __future__ import annotations",
                                              "from __future__ import annotations\nEDITED = 1")}
    changed = keys(sparsity_edit)
    assert {n for n in before if changed[n] != before[n]} == {"sparsity", "combined"}
    docstring = pipeline.read_source("bk.model").split('"""')[1]
    assert keys({"bk.model": (docstring, "An edited docstring.\n# and a comment")}) == before
    changed = keys({"bk.model": ("H0_DIAGONAL = -2.0", "H0_DIAGONAL = -2.5")})
    assert all(changed[n] != before[n] for n in before)
    assert keys({"bk.data": ("SPLITS: tuple", "SPLIT_NAMES = 1\nSPLITS: tuple")}) != before

    # The Bench names its checkpoints by these keys: the act edit moves act's file only.
    setup = tiny(tmp_path)

    def paths() -> dict[str, Path]:
        bench = Bench(setup)
        dense = bench.dense_plan()
        return {"dense": dense.path, **{name: bench.plan(
            name, classes[name], setup.model_config(bench.corpus), setup.train_config(1), {},
            dense).path for name in ("act", "early_exit")}}

    original = paths()
    source = pipeline.read_source
    monkeypatch.setattr(pipeline, "read_source", lambda module: source(module).replace(
        *act_edit[module]) if module in act_edit else source(module))
    edited = paths()
    assert {name for name in original if edited[name] != original[name]} == {"act"}


def test_a_second_process_waits_for_the_first_ones_model_instead_of_training_it(
        tmp_path, monkeypatch, capsys, fresh):
    setup = tiny(tmp_path / "shared")
    path = Bench(setup).dense_plan().path
    trained = []
    real_train = pipeline.train
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: trained.append(1) or real_train(*a,
                                                                                         **k))
    result = {}
    err = ""
    with locked(path):  # another process is training this model
        waiter = threading.Thread(target=lambda: result.update(model=Bench(setup).dense()))
        waiter.start()
        deadline = time.monotonic() + 30
        while "waiting for another process" not in err:
            assert time.monotonic() < deadline, "the second process did not wait"
            time.sleep(0.05)
            err += capsys.readouterr().err
        shutil.copy(fresh["bench"].dense_plan().path, path)  # ... and finishes
    waiter.join(60)
    err += capsys.readouterr().err
    assert trained == [] and "reusing" in err and str(path) in err
    assert same_weights(result["model"], fresh["dense"])


# ----------------------------------------------------------------------------- baseline records

def record_file(root, rec) -> Path:
    folder = root / "records"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "20260101T000000-aaaaaaaaaa.json"
    path.write_text(json.dumps(rec))  # json.dumps writes NaN, as an older writer could have
    return path


def good_record(setup: dict | None = None) -> dict:
    target = baselines.Target(10.0, 0.05, 0.01, 0.1)
    return baselines.make_record([make_row("act", 1.5)], setup or {"scale": "tiny"}, target,
                                 "a" * 40)


MALFORMED = {
    "a NaN speedup": lambda r: r["techniques"]["act"].update(wall_speedup=math.nan),
    "an infinite quality delta": lambda r: r["techniques"]["act"].update(
        quality_delta=math.inf),
    "a speedup as text": lambda r: r["techniques"]["act"].update(wall_speedup="2x"),
    "no speedup": lambda r: r["techniques"]["act"].pop("wall_speedup"),
    "no counts": lambda r: r["techniques"]["act"].pop("counts"),
    "a negative speedup": lambda r: r["techniques"]["act"].update(wall_speedup=-1.0),
    "a NaN cumulative speedup": lambda r: r["cumulative"].update(speedup=math.nan),
    "no cumulative": lambda r: r.pop("cumulative"),
    "techniques as a list": lambda r: r.update(techniques=[]),
    "no commit": lambda r: r.pop("commit"),
    "setup as text": lambda r: r.update(setup="quick"),
    "another schema": lambda r: r.update(schema=3),
    "a row of another scale": lambda r: r["techniques"]["act"].update(scale="small"),
    "a row of another technique": lambda r: r["techniques"]["act"].update(technique="mod"),
    "an IQR without the median": lambda r: r["techniques"]["act"].update(wall_q1=1.6),
}


@pytest.mark.parametrize("malformed", list(MALFORMED))
def test_a_malformed_record_is_refused_on_reading_naming_the_file(tmp_path, capsys, malformed):
    # A NaN speedup once passed `baseline check`; a missing field crashed it with a traceback.
    rec = good_record()
    MALFORMED[malformed](rec)
    path = record_file(tmp_path, rec)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        baselines.history(tmp_path)
    for command in (["baseline", "check", "--baselines", str(tmp_path), "--corpus", "synthetic",
                     "--output", str(tmp_path / "runs"), "--no-progress"],
                    ["report", "--baselines", str(tmp_path), "--output", str(tmp_path / "r")]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err
        assert err.startswith(f"bk-bench {command[0]}: error: ")


def test_check_refuses_measurements_of_another_setup_naming_the_fields(tmp_path, capsys):
    # A --quick check passed against a full record: other steps, rounds and batches.
    full = Setup(corpus="synthetic").describe()
    rec = good_record(full)
    quick = Setup.quick(corpus="synthetic", output=Path("elsewhere")).describe()
    target = baselines.Target(10.0, 0.05, 0.01, 0.1)
    with pytest.raises(ValueError, match="another setup") as caught:
        baselines.check([make_row("act", 1.5)], rec, target, setup=quick)
    for field in ("steps", "rounds", "workload_batches", "quality_batches"):
        assert f"{field}: record" in str(caught.value)
    assert "output" not in str(caught.value)
    assert baselines.check([make_row("act", 1.5)], rec, target, setup={
        **full, "output": "elsewhere"})[0].problem is None
    other_machine = {**rec, "machine": {**rec["machine"], "cpu": "another cpu"}}
    with pytest.raises(ValueError, match="machine cpu: record 'another cpu'"):
        baselines.check([make_row("act", 1.5)], other_machine, target, setup=full)
    record_file(tmp_path, rec)
    assert main(["baseline", "check", "--quick", "--corpus", "synthetic", "--baselines",
                 str(tmp_path), "--output", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another setup" in err and "steps: record 1500, now 300" in err
    assert not (tmp_path / "runs").exists(), "refused before training or measuring anything"


def test_a_non_finite_measured_speedup_never_makes_a_row_to_check():
    # A NaN speedup once passed every comparison of `baseline check`.
    for speedup in (math.nan, math.inf, -1.0):
        with pytest.raises(RowError, match="wall_speedup"):
            make_row("act", speedup)


def test_the_quality_budget_counts_a_delta_exactly_at_its_boundary():
    target = baselines.Target(10.0, 0.05, 0.01, 0.1)
    assert target.counts(0.05)
    assert not target.counts(math.nextafter(0.05, 1))
    assert not target.counts(None) and not target.counts(math.nan)


def git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_a_dirty_working_tree_is_never_recorded_as_head(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert baselines.git_commit(tmp_path) == head
    (tmp_path / "baselines" / "records").mkdir(parents=True)
    (tmp_path / "baselines" / "records" / "new.json").write_text("{}")  # a record: not code
    assert baselines.git_commit(tmp_path) == head
    for dirty in ("edit", "untracked"):
        if dirty == "edit":
            (tmp_path / "code.py").write_text("x = 2\n")
        else:
            git(tmp_path, "checkout", "-q", "code.py")
            (tmp_path / "new.py").write_text("y = 1\n")
        with pytest.raises(ValueError, match="uncommitted change.*--allow-dirty"):
            baselines.git_commit(tmp_path)
        assert baselines.git_commit(tmp_path, allow_dirty=True) == f"{head}-dirty"
    rec = {**good_record(), "commit": f"{head}-dirty"}
    assert baselines.record(rec, tmp_path / "baselines").name.split("-")[2] == "dirty"


# ----------------------------------------------------------------------------- files

REPO = Path(__file__).resolve().parent.parent


def start_killable_writer(tmp_path, body: str) -> subprocess.Popen:
    """A Python process running ``body`` (with ``hang``: write half, signal, sleep)."""
    marker = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path

        def hang(handle):
            handle.write(b"half of the new content")
            handle.flush()
            Path({str(marker)!r}).touch()
            time.sleep(120)
    """) + textwrap.dedent(body)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, "the writer died early"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_run_killed_while_writing_its_results_leaves_the_previous_set_whole(tmp_path):
    # A kill once left results.json of the new run beside results.csv of the old one, and a
    # 0-byte speedups.png.
    out = tmp_path / "runs"
    publish(out, "results", {"results.json": "old json", "results.csv": "old csv",
                             "speedups.png": b"old png"})
    proc = start_killable_writer(tmp_path, f"""
        from bench.files import publish
        publish(Path({str(out)!r}), "results", {{"results.json": "new json",
                "results.csv": "new csv", "speedups.png": hang}})
    """)
    proc.kill()
    proc.wait()
    assert [(out / f).read_bytes() for f in ("results.json", "results.csv", "speedups.png")] == [
        b"old json", b"old csv", b"old png"]
    assert temporaries(out), "the killed writer left its temporary (removed below)"
    publish(out, "results", {"results.json": "next json", "results.csv": "next csv",
                             "speedups.png": b"next png"})
    assert (out / "speedups.png").read_bytes() == b"next png"
    assert temporaries(out) == []
    assert len(list((out / ".sets").iterdir())) == 2  # the pointer and the newest set


def test_a_temporary_left_by_a_killed_writer_never_stays_in_the_records_folder(tmp_path):
    records = tmp_path / "records"
    proc = start_killable_writer(tmp_path, f"""
        from bench.files import write_new
        write_new(Path({str(records / "x.json")!r}), hang)
    """)
    [left] = temporaries(records)
    proc.kill()
    proc.wait()
    alive = records / f".y.json.{os.getpid()}-{HOST}-0123abcd.tmp"  # a live writer's: kept
    alive.write_text("")
    baselines.record(good_record(), tmp_path)
    assert temporaries(records) == [alive]
    ignored = subprocess.run(["git", "check-ignore", "-q", f"baselines/records/{left.name}"],
                             cwd=REPO)
    assert ignored.returncode == 0, "a temporary in baselines/records is ignored by git"


def test_result_files_and_checkpoints_follow_the_umask(tmp_path, checkpoint_file):
    # mkstemp once made every result 0600 whatever the umask.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    previous = os.umask(0o027)
    try:
        write_atomic(tmp_path / "plot.png", figure_writer(plt.figure()))
        write_atomic(tmp_path / "a.json", "{}")
        write_new(tmp_path / "b.json", "{}")
        publish(tmp_path, "results", {"results.json": "{}"})
        corpus = load_corpus("synthetic")
        model, _ = load_model(checkpoint_file)
        save_checkpoint(tmp_path / "c.pt", model, corpus.vocab, step=3)
    finally:
        os.umask(previous)
    for name in ("plot.png", "a.json", "b.json", "results.json", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


# ----------------------------------------------------------------------------- the command

def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as code:
        main(["--help"])
    assert code.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out and "  0  success" in out
    assert "  1  a check failed" in out and "  2  bad input or usage" in out


@pytest.mark.parametrize("argv", [
    ["run", "--steps", "-5"],
    ["run", "--batch-size", "0"],
    ["run", "--batch-size", str(10**30)],  # once an int64 overflow traceback inside torch
    ["run", "--seed", "-1"],
    ["baseline", "check", "--tolerance", "nan"],  # once: every speedup drop passed
    ["measure", "act", "--knob", "novalue"],
    ["tune", "act", "--n-calls", "x"],
    ["nonsense"],
])
def test_bad_options_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(r"bk-bench( \w+)?: error: ", err), err


def test_an_oversized_batch_names_the_setting_to_lower(tmp_path, capsys):
    code = main(["train", "--corpus", "synthetic", "--steps", "1", "--seq-len", "8",
                 "--batch-size", str(10**13), "--output", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "out of memory" in err and "lower --batch-size (now 10000000000000)" in err


def test_a_regression_exits_1_and_a_clean_check_0(tmp_path, capsys):
    argv = ["--quick", "--corpus", "synthetic", "--steps", "2", "--seq-len", "16",
            "--batch-size", "4", "--rounds", "1", "--output", str(tmp_path / "runs"),
            "--no-progress"]
    setup = setup_from(build_parser().parse_args(["baseline", "check", *argv]))
    target = baselines.Target(10.0, 0.05, 0.01, 0.1)
    rec = baselines.make_record([make_row("sparsity", 100.0)], setup.describe(), target, "a" * 40)
    path = record_file(tmp_path / "baselines", rec)
    check = ["baseline", "check", "--techniques", "sparsity", "--baselines",
             str(tmp_path / "baselines"), *argv]
    assert main(check) == 1
    assert "speedup fell" in capsys.readouterr().out
    rec["techniques"]["sparsity"] = make_row("sparsity", 1e-3, ppl_cand=12).to_dict()
    path.write_text(json.dumps(rec))
    assert main(check) == 0


def test_distillation_trains_the_technique_from_the_dense_model_and_never_the_control(
        tmp_path, monkeypatch):
    setup = replace(tiny(tmp_path), distill=0.5, steps=2)
    bench = Bench(setup)
    act = get("act")
    technique_plan, _ = bench._plan_of("act", act)
    control_plan, _ = bench._plan_of(pipeline.CONTROL, act)
    assert technique_plan.train_config.distill == 0.5
    assert control_plan.train_config.distill == 0.0 and bench.dense_plan().train_config.distill == 0
    undistilled, _ = Bench(replace(setup, distill=0.0))._plan_of("act", act)
    assert undistilled.path != technique_plan.path  # another request, another checkpoint

    teachers = []
    real_train = pipeline.train
    monkeypatch.setattr(pipeline, "train", lambda model, corpus, cfg, **k: teachers.append(
        (cfg.distill, k.get("teacher"))) or real_train(model, corpus, cfg, **k))
    bench.candidate("act")
    bench.reference("act")
    dense = bench.dense()
    assert [(w, t is dense) for w, t in teachers] == [(0.0, False), (0.5, True), (0.0, False)]
    with pytest.raises(ValueError, match="distill"):
        replace(setup, distill=float("nan"))


def test_a_sweep_labels_a_switched_off_knob_none_not_nan(tmp_path):
    from bench.run import sweep

    df, path = sweep(tiny(tmp_path), "sparsity", "capacity", [None, 0.5])
    assert list(df["capacity"]) == ["none", 0.5]
    assert "nan" not in path.with_suffix(".csv").read_text().split("\n")[1].split(",")[:3]
