"""The pipeline at every scale: the scale reaches every model and row and a comparison never mixes
scales; an interrupted training resumes to exactly the weights of an uninterrupted one; a run
reports its progress by phases, cached models as skipped phases."""

import io
import json
import re
from dataclasses import asdict, replace

import pytest
import torch

from bench import baselines, console, pipeline, report
from bench.cli import build_parser, main, setup_from
from bench.pipeline import CONTROL, SCALE_SETTINGS, Bench, Setup, axis_variants
from bench.progress import Progress
from bench.registry import REFERENCE, Technique, techniques
from bench.rows import Row
from bench.run import run
from bk.data import load_corpus
from bk.model import SCALES, ModelConfig
from bk.technique import Knob
from bk.train import TrainConfig, partial_checkpoint, train
from tests.strategies import TINY_4_LAYERS

TARGET = baselines.Target(10.0, 0.05, 0.01, 0.1)


def small_setup(output, **overrides) -> Setup:
    return Setup(**{"corpus": "synthetic", "steps": 4, "batch_size": 4, "seq_len": 16,
                    "rounds": 1, "workload_batches": 1, "quality_batches": 2,
                    "ceiling_batches": 1, "output": output, "progress": False, **overrides})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- scales

SETUP_COMMANDS = [["run"], ["train"], ["measure", "act"], ["sweep", "act", "--knob", "a=1,2"],
                  ["tune", "act"], ["baseline", "check"]]


@pytest.mark.parametrize("command", SETUP_COMMANDS)
def test_every_model_building_command_takes_a_scale_with_its_defaults(command):
    def setup(*options):
        made = setup_from(build_parser().parse_args([*command, *options]))
        assert made.quality_split == ("valid" if command[0] == "tune" else "test")
        return replace(made, quality_split="test")

    assert setup("--scale", "small") == Setup.at_scale("small")
    assert setup("--scale", "small", "--steps", "7", "--rounds", "2") == Setup.at_scale(
        "small", steps=7, rounds=2)
    assert setup() == Setup() == Setup.at_scale("tiny")  # tiny unless told otherwise
    assert setup("--quick").scale == "tiny" and setup("--quick") == Setup.quick()
    assert setup("--quick", "--scale", "small") == Setup.quick("small")
    assert setup("--scale", "small", "--finetune", "2") == Setup.at_scale("small",
                                                                          finetune_factor=2.0)


def test_the_finetune_factor_multiplies_the_techniques_steps_and_the_controls_alike(tmp_path):
    setup = small_setup(tmp_path, scale="small", steps=10, finetune_factor=2.0)
    bench = Bench(setup, load_corpus("synthetic"), target=TARGET)
    act = techniques()["act"]
    assert bench.finetune_steps(act) == 6  # 10 steps x fraction 0.3 x 2
    technique_plan, _ = bench._plan_of("act", act)
    control_plan, _ = bench._plan_of(CONTROL, act)
    assert technique_plan.train_config.steps == control_plan.train_config.steps == 6
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["measure", "act", "--finetune", bad])


@pytest.mark.parametrize("command", [["decode"], ["routing-stats"], ["ceilings"]])
def test_the_other_model_building_commands_take_a_scale(command):
    assert build_parser().parse_args([*command, "--scale", "base"]).scale in ("base", ["base"])


def test_each_scales_defaults_come_from_its_row_of_the_one_table():
    assert list(SCALE_SETTINGS) == list(SCALES)
    for scale, settings in SCALE_SETTINGS.items():
        setup = Setup.at_scale(scale)
        assert {k: getattr(setup, k) for k in asdict(settings)} == asdict(settings)
    small = Setup.at_scale("small")
    assert small.finetune_steps(techniques()["act"]) == 300  # fraction 0.3 at 2 / 3: 0.2
    assert Setup().finetune_steps(techniques()["act"]) == 450
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        Setup.at_scale("huge")
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        Setup(scale="huge")


def test_a_bench_at_a_scale_trains_that_scale_and_its_rows_carry_it(tmp_path):
    corpus = load_corpus("synthetic")
    plans = {}
    for scale in ("tiny", "small"):
        bench = Bench(small_setup(tmp_path, scale=scale, steps=1), corpus, target=TARGET)
        row = bench.measure("mod", ceilings=True)
        assert row.scale == scale and row.decisions == "learned"
        assert bench.dense().cfg == ModelConfig.at_scale(scale, vocab_size=len(corpus.vocab),
                                                          n_seq=16)
        plans[scale] = bench.dense_plan()
    assert plans["tiny"].path != plans["small"].path  # one cache entry per scale


def test_a_record_and_a_check_never_mix_scales(tmp_path, capsys):
    def row(name, scale, speed=2.0):
        return Row(name, scale, speed, reference_perplexity=10.0, candidate_perplexity=10.1,
                   quality_delta=0.01, counts=True)

    with pytest.raises(ValueError, match="rows of scale small in a record of scale 'tiny'"):
        baselines.make_record([row("act", "tiny"), row("mod", "small")], {"scale": "tiny"},
                              TARGET, "c")
    setups = {scale: Setup.quick(scale, corpus="synthetic").describe() for scale in SCALES}
    (tmp_path / "records").mkdir()
    for i, scale in enumerate(["small", "tiny", "base"]):  # base is the latest
        rec = baselines.make_record([row("act", scale, 2.0 + i)], setups[scale], TARGET, "c")
        (tmp_path / "records" / f"2026010{i}-c.json").write_text(json.dumps(rec))
    history = baselines.records(tmp_path)
    _, latest = baselines.latest_comparable(history, setups["tiny"])
    assert baselines.record_scale(latest) == "tiny" and latest["cumulative"]["speedup"] == 3.0
    with pytest.raises(ValueError, match="another scale than the record's"):
        baselines.check([row("act", "small")], latest, TARGET, setup=setups["tiny"])
    assert [r["cumulative"]["speedup"] for r in baselines.history(tmp_path, "small")] == [2.0]
    with pytest.raises(ValueError, match="scale: record 'tiny', now 'small'"):
        baselines.check([row("act", "small")], latest, TARGET, setup=setups["small"])
    (tmp_path / "records" / "20260100-c.json").unlink()
    assert main(["baseline", "check", "--quick", "--scale", "small", "--corpus", "synthetic",
                 "--baselines", str(tmp_path), "--output", str(tmp_path / "runs")]) == 2
    assert "no baseline record at scale 'small'" in capsys.readouterr().err
    html = report.section_cumulative(baselines.history(tmp_path), TARGET, tmp_path)
    assert "scale tiny" in html and "scale base" in html
    assert (tmp_path / "cumulative-tiny.png").is_file()
    assert (tmp_path / "cumulative-base.png").is_file()


def test_the_cumulative_history_of_a_scale_is_drawn_per_processor(tmp_path):
    """A model's ratios differ between processors, so one history line never joins records of
    two: each processor at a scale gets its own heading, table and plot."""
    setup = Setup.quick("tiny", corpus="synthetic").describe()
    records = []
    for i, (cpu, commit) in enumerate([("Intel Xeon", "aaaaaaa"), ("AMD EPYC", "bbbbbbb"),
                                       ("Intel Xeon", "ccccccc")]):
        act = Row("act", "tiny", 1.0 + i, reference_perplexity=10.0, candidate_perplexity=10.1,
                  quality_delta=0.01, counts=True)
        rec = baselines.make_record([act], setup, TARGET, commit)
        rec["machine"] = {**rec["machine"], "cpu": cpu}
        records.append(rec)
    html = report.section_cumulative(records, TARGET, tmp_path)
    intel, amd = html.index("scale tiny, Intel Xeon"), html.index("scale tiny, AMD EPYC")
    assert intel < amd  # in the order of their first records
    intel_part, amd_part = html[intel:amd], html[amd:]
    assert "aaaaaaa" in intel_part and "ccccccc" in intel_part and "bbbbbbb" not in intel_part
    assert "bbbbbbb" in amd_part and "aaaaaaa" not in amd_part and "ccccccc" not in amd_part
    assert (tmp_path / "cumulative-tiny-intel-xeon.png").is_file()
    assert (tmp_path / "cumulative-tiny-amd-epyc.png").is_file()


def test_a_record_whose_scale_is_not_its_setups_is_refused(tmp_path):
    rec = baselines.make_record([], {"scale": "tiny"}, TARGET, "c")
    rec["scale"] = "small"
    with pytest.raises(ValueError, match="field 'scale' is 'small'"):
        baselines.validate_record(rec, "r.json")
    old = {**rec, "schema": 1}
    del old["scale"]
    assert baselines.record_scale(baselines.validate_record(old, "r.json")) == "tiny"


# ----------------------------------------------------------------------------- quality split

def test_quality_is_scored_on_the_setups_held_out_split(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="quality_split 'train'; expected one of valid, test"):
        small_setup(tmp_path, quality_split="train")
    seen = []
    real = pipeline.evaluate

    def spy(model, corpus, split, **options):
        seen.append(split)
        return real(model, corpus, split, **options)

    monkeypatch.setattr(pipeline, "evaluate", spy)
    losses = {}
    for split in ("valid", "test"):
        bench = Bench(small_setup(tmp_path, quality_split=split))
        losses[split] = bench.quality(bench.dense()).loss
        assert seen.pop() == split
        assert [p.units for p in bench.job([]) if p.name == f"quality {REFERENCE}"] == [2]
    assert losses["valid"] != losses["test"]


def test_a_run_refuses_to_report_quality_from_the_validation_split(tmp_path):
    with pytest.raises(ValueError, match="a run reports quality on the test split"):
        run(small_setup(tmp_path, quality_split="valid"), ["act"])
    assert not (tmp_path / "checkpoints").exists(), "refused before training anything"


def test_a_record_from_before_the_quality_split_compares_as_scored_on_test():
    now = Setup(corpus="synthetic").describe()
    old = baselines.make_record([], {k: v for k, v in now.items() if k != "quality_split"},
                                TARGET, "a" * 40)
    assert baselines.setup_differences(old, now, here=old["machine"]) == []
    valid = Setup(corpus="synthetic", quality_split="valid").describe()
    assert baselines.setup_differences(old, valid, here=old["machine"]) == [
        "quality_split: record 'test', now 'valid'"]


# ----------------------------------------------------------------------------- resuming

class Interrupted(Exception):
    pass


def interrupt_at(step: int):
    def after_step(done: int) -> None:
        if done == step:
            raise Interrupted

    return after_step


@pytest.mark.parametrize("name", list(techniques()))
def test_a_training_interrupted_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(
        tmp_path, name):
    technique = techniques()[name]
    corpus = load_corpus("synthetic")
    config = replace(TINY_4_LAYERS, vocab_size=len(corpus.vocab))
    cfg = TrainConfig(steps=7, batch_size=3, warmup=2, lr=1e-2)

    def model(seed):
        torch.manual_seed(seed)
        return technique.make(config)

    def fit(m, path, **options):
        def on_step(step, trained):
            if technique.schedule is not None:
                technique.schedule(trained, step / cfg.steps)

        return train(m, corpus, cfg, checkpoint=path, progress=False, on_step=on_step,
                     checkpoint_every=3, meta={"m": name}, **options)

    whole = model(0)
    fit(whole, tmp_path / "whole.pt")
    path = tmp_path / "resumed.pt"
    with pytest.raises(Interrupted):
        fit(model(0), path, after_step=interrupt_at(5))
    assert not path.exists() and partial_checkpoint(path).exists()
    done = []
    resumed = model(1)  # other initial weights: all of them must come from the checkpoint
    result = fit(resumed, path, resume=True, after_step=done.append)
    assert done == [4, 5, 6, 7] and result.steps == 7  # from the checkpoint of step 3 on
    assert same_weights(resumed, whole)
    assert path.exists() and not partial_checkpoint(path).exists()


def test_a_partial_checkpoint_of_another_training_is_not_resumed(tmp_path):
    corpus = load_corpus("synthetic")
    config = replace(TINY_4_LAYERS, vocab_size=len(corpus.vocab))
    cfg = TrainConfig(steps=4, batch_size=3, warmup=1)
    path = tmp_path / "m.pt"
    torch.manual_seed(0)
    with pytest.raises(Interrupted):
        train(pipeline.LanguageModel(config), corpus, cfg, checkpoint=path, progress=False,
              checkpoint_every=2, meta={"request": "a"}, after_step=interrupt_at(3))
    done = []
    train(pipeline.LanguageModel(config), corpus, cfg, checkpoint=path, progress=False,
          checkpoint_every=2, meta={"request": "b"}, resume=True, after_step=done.append)
    assert done == [1, 2, 3, 4]


def test_a_bench_killed_mid_training_resumes_from_its_last_periodic_checkpoint(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setattr(pipeline, "CHECKPOINT_EVERY", 3)
    fresh = Bench(small_setup(tmp_path / "fresh", steps=8)).dense()
    setup = small_setup(tmp_path / "killed", steps=8)
    real_train = pipeline.train

    def killed(*args, after_step, **kwargs):
        def step(done):
            after_step(done)
            if done == 7:
                raise KeyboardInterrupt

        return real_train(*args, after_step=step, **kwargs)

    monkeypatch.setattr(pipeline, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        Bench(setup).dense()
    monkeypatch.setattr(pipeline, "train", real_train)
    bench = Bench(setup)
    bench.progress = Progress(bench.job([REFERENCE], ceilings=False), live=False,
                              stream=io.StringIO())
    plan = bench.dense_plan()
    assert partial_checkpoint(plan.path).exists() and not plan.path.exists()
    assert same_weights(bench.dense(), fresh)
    trained = bench.progress.phases[0]
    assert (trained.name, trained.resumed, trained.done) == (f"train {REFERENCE}", 6, 8)
    assert not partial_checkpoint(plan.path).exists()


# ----------------------------------------------------------------------------- progress

def test_every_phase_of_a_run_is_in_its_job_and_a_second_run_serves_every_model_from_the_cache(
        tmp_path, capsys):
    setup = small_setup(tmp_path, steps=3, progress=True)
    run(setup)
    err = capsys.readouterr().err
    phases = Bench(setup).job(list(techniques()), axes=True)
    trainings = [p for p in phases if p.name.startswith(("train ", "fine-tune "))]
    assert all(p.skipped for p in trainings), "the job knows every model is cached now"
    assert re.search(rf"finished in \S+ \({len(phases)} phases ran\)", err), err
    run(setup)
    err = capsys.readouterr().err
    assert re.search(rf"\({len(phases) - len(trainings)} phases ran, {len(trainings)} served "
                     r"from the cache\)", err), err
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["technique"]: Row.from_dict(r, "results.json") for r in results["rows"]}
    assert results["record"]["scale"] == "tiny" and {r.scale for r in rows.values()} == {"tiny"}
    assert rows["multiscale"].decisions == "none"
    assert rows["multiscale"].ceiling_uniform == rows["multiscale"].wall_speedup
    assert rows["mod"].decisions == "learned" and rows["mod"].keep_uniform is not None
    axes = baselines.record_axes(results["record"])
    assert set(axes) == {"combined"}  # the one technique that declares axes
    combined = techniques()["combined"]
    defaults = combined.resolve()
    switched_on = {axis for axis, off in combined.axes.items()
                   if any(defaults[k] != v for k, v in off.items())}
    assert set(axes["combined"]) == switched_on and {"sequence", "depth"} <= switched_on
    for axis in switched_on:
        off = combined.axes[axis]
        assert axes["combined"][axis].technique == "combined"
        assert {k: axes["combined"][axis].knobs[k] for k in off} == off
    assert axes["combined"]["depth"].keep_uniform is None  # these rows explain, no ceilings


def test_an_axis_is_measured_off_only_where_the_defaults_switch_it_on():
    knobs = (Knob("width", int, 2, "on above 1", low=1), Knob("skip", float, None, "off: none",
                                                              optional=True))
    technique = Technique("composed", "two axes", build=lambda config, values: None,
                          knobs=knobs, axes={"width": {"width": 1}, "skip": {"skip": None}})
    assert axis_variants(technique) == {"width": {"width": 1}}
    assert axis_variants(technique, {"skip": 0.5}) == {"width": {"skip": 0.5, "width": 1},
                                                       "skip": {"skip": None}}
    assert axis_variants(technique, {"width": 1}) == {}
    assert set(axis_variants(techniques()["combined"])) == {
        axis for axis, off in techniques()["combined"].axes.items()
        if any(techniques()["combined"].resolve()[k] != v for k, v in off.items())}


# ----------------------------------------------------------------------------- knobs set for a run

def test_a_run_measures_a_technique_at_the_knobs_set_for_it_and_its_record_names_them(tmp_path):
    def mod_row(setup):
        record = run(setup, ["dense", "mod", "act"])
        rows = json.loads((setup.output / "results.json").read_text())["rows"]
        return record, {r["technique"]: Row.from_dict(r, "results.json") for r in rows}

    set_record, set_rows = mod_row(small_setup(tmp_path / "set", steps=3,
                                               knobs={"mod": {"capacity": 0.25}}))
    default_record, default_rows = mod_row(small_setup(tmp_path / "default", steps=3))
    mod = techniques()["mod"]
    assert set_rows["mod"].knobs == mod.resolve({"capacity": 0.25}) != mod.resolve()
    assert default_rows["mod"].knobs == mod.resolve()
    assert set_rows["act"].knobs == default_rows["act"].knobs == techniques()["act"].resolve()
    # the model that ran is the one the row names: a quarter of the tokens runs fewer FLOPs
    assert set_rows["mod"].work_ratio < default_rows["mod"].work_ratio
    assert set_record["setup"]["knobs"] == {"mod": {"capacity": 0.25}}
    assert default_record["setup"]["knobs"] == {}
    assert baselines.setup_differences(set_record, default_record["setup"],
                                       here=set_record["machine"]) == [
        "knobs: record {'mod': {'capacity': 0.25}}, now {}"]


def test_knobs_set_for_a_run_carry_into_each_axis_switched_off(tmp_path):
    combined = techniques()["combined"]
    setup = small_setup(tmp_path, knobs={"combined": {"factor": 4}})
    bench = Bench(setup, load_corpus("synthetic"), target=TARGET)
    assert bench.knobs(combined) == combined.resolve({"factor": 4})
    assert bench.knobs(combined, {"factor": 2})["factor"] == 2  # a knob given wins
    variants = axis_variants(combined, setup.knobs["combined"])
    assert variants["sequence"]["factor"] == 1 and variants["depth"]["factor"] == 4
    depth_off, _ = bench._plan_of("combined", combined, variants["depth"])
    assert depth_off.request["knobs"] == combined.resolve({"factor": 4, "depth_capacity": None})
    assert bench._plan_of("combined", combined)[0].request["knobs"]["factor"] == 4


def test_a_record_from_before_run_knobs_compares_as_measured_at_the_defaults():
    now = Setup(corpus="synthetic").describe()
    old = baselines.make_record([], {k: v for k, v in now.items() if k != "knobs"}, TARGET,
                                "a" * 40)
    assert baselines.setup_differences(old, now, here=old["machine"]) == []
    tuned = Setup(corpus="synthetic", knobs={"act": {"act_lambda": 0.1}}).describe()
    assert baselines.setup_differences(old, tuned, here=old["machine"]) == [
        "knobs: record {}, now {'act': {'act_lambda': 0.1}}"]


@pytest.mark.parametrize("options, message", [
    (["--knob", "levels=3"], "expected TECHNIQUE.KNOB=VALUE"),
    (["--knob", "multiscale.=3"], "expected TECHNIQUE.KNOB=VALUE"),
    (["--knob", "multiscale.levels"], "expected NAME=VALUE"),
])
def test_a_run_knob_without_its_technique_is_refused_before_anything_runs(options, message,
                                                                          capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", *options])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--knob", "nosuch.levels=3"], "unknown technique 'nosuch'"),
    (["--knob", "act.levels=3"], "has no knob 'levels'; its knobs are act_threshold"),
    (["--knob", "act.act_threshold=2"], "act_threshold"),
    (["--techniques", "dense", "mod", "--knob", "act.act_lambda=0.1"],
     "knobs set for 'act', which is not measured here (measured: dense, mod)"),
])
@pytest.mark.parametrize("command", [["run"], ["baseline", "record"]])
def test_a_bad_run_knob_is_refused_naming_it_before_anything_trains(command, options, message,
                                                                    tmp_path, capsys):
    status = main([*command, "--corpus", "synthetic", "--output", str(tmp_path), *options])
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_the_setup_takes_knobs_by_technique_only():
    for bad in ({"act": 0.1}, {"act": {1: 0.1}}, [("act", {})]):
        with pytest.raises(ValueError, match="expected knob values by technique"):
            Setup(knobs=bad)
    assert Setup(knobs={"mod": {}, "act": {"act_lambda": 0.1}}).knobs == {
        "act": {"act_lambda": 0.1}}
    parsed = setup_from(build_parser().parse_args(
        ["run", "--knob", "mod.capacity=0.25", "--knob", "mod.routed=inner",
         "--knob", "act.act_lambda=0.1"]))
    assert parsed.knobs == {"act": {"act_lambda": 0.1},
                            "mod": {"capacity": 0.25, "routed": "inner"}}


# ----------------------------------------------------------------------------- from scratch

def test_a_technique_from_scratch_is_its_own_initialisation_trained_as_the_dense_model(tmp_path):
    setup = small_setup(tmp_path, steps=3, start="scratch")
    corpus = load_corpus("synthetic")
    bench = Bench(setup, corpus, target=TARGET)
    multiscale = techniques()["multiscale"]
    assert bench.from_scratch(multiscale) and bench.training_steps(multiscale) == 3
    assert bench.reference_name(multiscale) == REFERENCE  # no control: the same training
    plan, _ = bench._plan_of("multiscale", multiscale)
    assert plan.request["start"] == "scratch" and plan.request["parent"] is None
    candidate = bench.candidate(multiscale)
    torch.manual_seed(setup.seed)
    by_hand = multiscale.build(setup.model_config(corpus), multiscale.resolve())
    train(by_hand, corpus, setup.train_config(), progress=False)
    assert same_weights(candidate, by_hand)
    finetuned = Bench(replace(setup, start="dense"), corpus, target=TARGET).candidate(multiscale)
    assert not same_weights(candidate, finetuned)
    row = bench.measure(multiscale)
    assert row.reference_perplexity == bench.quality(bench.dense()).perplexity


def test_a_technique_whose_steps_only_calibrate_starts_from_the_dense_weights_either_way(
        tmp_path):
    routing_cache = techniques()["routing_cache"]
    assert not routing_cache.updates_weights
    plans = []
    for start in pipeline.STARTS:
        bench = Bench(small_setup(tmp_path, start=start), load_corpus("synthetic"), target=TARGET)
        assert not bench.from_scratch(routing_cache)
        assert bench.training_steps(routing_cache) == bench.finetune_steps(routing_cache)
        plans.append(bench._plan_of("routing_cache", routing_cache)[0])
    assert plans[0].key == plans[1].key and "start" not in plans[0].request


def test_a_technique_from_scratch_distils_from_the_dense_model_under_its_own_key(tmp_path):
    act = techniques()["act"]
    keys = {}
    for start in pipeline.STARTS:  # a factor that makes the fine-tuning the dense steps long
        setup = small_setup(tmp_path, steps=10, finetune_factor=10 / 3, distill=1.0,
                            start=start)
        bench = Bench(setup, load_corpus("synthetic"), target=TARGET)
        plan, _ = bench._plan_of("act", act)
        assert plan.train_config.steps == 10 and plan.train_config.distill == 1.0
        assert plan.request["parent"] == bench.dense_plan().key  # the start or the teacher
        keys[start] = plan.key
    assert keys["dense"] != keys["scratch"]


def test_a_run_from_scratch_trains_each_technique_and_no_control(tmp_path):
    bench = Bench(small_setup(tmp_path, steps=3, start="scratch"), load_corpus("synthetic"),
                  target=TARGET)
    names = [p.name for p in bench.job(["dense", "multiscale", "routing_cache"])]
    assert "train multiscale" in names and "fine-tune routing_cache" in names
    assert not any(CONTROL in name for name in names)
    dense_start = Bench(small_setup(tmp_path, steps=3), load_corpus("synthetic"),
                        target=TARGET).job(["multiscale"])
    assert {"fine-tune multiscale", f"fine-tune {CONTROL}"} <= {p.name for p in dense_start}


def test_the_start_is_a_setting_of_the_command_line_the_record_and_the_figure_titles():
    assert setup_from(build_parser().parse_args(["run", "--start", "scratch"])).start == (
        "scratch")
    assert setup_from(build_parser().parse_args(["run"])).start == "dense"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--start", "random"])
    with pytest.raises(ValueError, match="start 'random'; expected one of dense, scratch"):
        Setup(start="random")
    now = Setup(corpus="synthetic").describe()
    old = baselines.make_record([], {k: v for k, v in now.items() if k != "start"}, TARGET,
                                "a" * 40)
    assert baselines.setup_differences(old, now, here=old["machine"]) == []
    scratch = Setup(corpus="synthetic", start="scratch").describe()
    assert baselines.setup_differences(old, scratch, here=old["machine"]) == [
        "start: record 'dense', now 'scratch'"]
    assert "trained from scratch" in console.setup_title(scratch)
    assert "scratch" not in console.setup_title(now)
