"""`bk-bench decode` end to end on a small setting: every figure is written and consistent."""

import csv
import json

from bench.cli import main


def test_the_decode_report_writes_every_figure_with_both_steps(tmp_path, capsys):
    out = tmp_path / "decode"
    main(["decode", "--out", str(out), "--tokens", "6", "--batch", "1,2", "--rounds", "1",
          "--rollouts", "1,2", "--search-tokens", "3", "--samples", "1"])
    report = json.loads((out / "decode.json").read_text())
    rows = report["generation"]
    assert [(r["batch"], r["step"]) for r in rows] == [
        (1, "kernel"), (1, "torch"), (2, "kernel"), (2, "torch")]
    for row in rows:
        # cached: prompt and fed tokens once per layer; recompute: every prefix again
        layers, fed = report["model"]["n_layers"], 16 + 6 - 1
        assert row["cached_positions"] == row["batch"] * fed * layers
        assert row["recompute_positions"] > row["cached_positions"]
        assert row["same_tokens"] is True
        assert row["speedup"] > 0 and row["speedup_q1"] <= row["speedup"] <= row["speedup_q3"]
    assert [r["same_result"] for r in report["search_same_work"]] == [True, True]
    assert len(report["search_less_work"]) == 1
    with (out / "generation.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "wrote" in capsys.readouterr().out
