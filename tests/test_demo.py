"""``python -m miras demo`` end to end in a tiny configuration (seconds), and its task generators."""
from __future__ import annotations

import json
import os

import pytest
import torch

miras = pytest.importorskip("miras")
from miras import demo  # noqa: E402
from miras.__main__ import main as cli_main  # noqa: E402

TINY = ["--steps", "3", "--seq-lens", "12,20", "--batch-size", "4", "--d-model", "16", "--num-heads", "2",
        "--chunk-size", "4", "--eval-batches", "1", "--eval-batch-size", "8", "--num-keys", "8", "--num-values",
        "8", "--needles", "2", "--queries", "1", "--quiet"]


def test_demo_runs_end_to_end_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert cli_main(["demo", *TINY, "--jobs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["seq_lens"] == [12, 20]
    got = {(r["model"], r["task"]) for r in data["results"]}
    assert got == {(m, t) for m in demo.ALL_MODELS for t in demo.ALL_TASKS}
    for r in data["results"]:
        assert set(r["accuracy"]) == {"12", "20"}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert r["train_tokens_per_s"] > 0 and r["params"] > 0
    for m in demo.ALL_MODELS:
        assert m in printed
    try:
        import matplotlib  # noqa: F401
        assert (out / "accuracy.png").stat().st_size > 0
    except ImportError:
        assert "plot skipped" in printed


def test_demo_parallel_workers(tmp_path):
    out = tmp_path / "par"
    res = demo.main([*TINY, "--jobs", "2", "--models", "titans,linear_attention", "--tasks", "mqar",
                     "--no-plot", "--out", str(out)])
    assert [(r["model"], r["task"]) for r in res["results"]] == [("titans", "mqar"), ("linear_attention", "mqar")]
    assert json.loads((out / "results.json").read_text())["results"] == res["results"]


def test_cli_usage_and_errors(capsys):
    assert cli_main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2
    with pytest.raises(SystemExit):
        demo.main(["--models", "gpt5", "--steps", "0", "--no-plot", "--quiet"])


def test_mqar_batches_are_well_formed():
    v = demo.Vocab(16, 16)
    ids, labels = demo.make_mqar(torch.Generator().manual_seed(0), v, 3, 24)
    n = 24 // 4
    assert ids.shape == labels.shape == (3, 24)
    for b in range(3):
        ctx = dict(zip(ids[b, 0:2 * n:2].tolist(), ids[b, 1:2 * n:2].tolist()))
        assert len(ctx) == n                                      # distinct keys
        qk, qv = ids[b, 2 * n::2].tolist(), ids[b, 2 * n + 1::2].tolist()
        assert sorted(qk) == sorted(ctx) and all(ctx[k] == val for k, val in zip(qk, qv))
        lab = labels[b][labels[b] != demo.IGNORE].tolist()
        assert lab == qv                                          # labels: the queried values only


def test_niah_batches_are_well_formed():
    v = demo.Vocab(10, 10)
    ids, labels = demo.make_niah(torch.Generator().manual_seed(1), v, 4, 40, needles=3, queries=2)
    for b in range(4):
        row = ids[b].tolist()
        marks = [i for i in range(34) if row[i] == v.mark]
        assert len(marks) == 3                                    # needles, never overlapping
        needles = {row[i + 1]: row[i + 2] for i in marks}
        for j in range(2):
            s = 34 + 3 * j
            assert row[s] == v.query and needles[row[s + 1]] == row[s + 2]
            assert labels[b, s + 2] == row[s + 2]
        assert int((labels[b] != demo.IGNORE).sum()) == 2
    with pytest.raises(ValueError):
        demo.make_niah(torch.Generator(), v, 1, 8, needles=3, queries=2)


def test_demo_design_points_and_seeds(tmp_path, capsys):
    """--models takes settings and design-space points; --seeds N reports mean ± std per cell."""
    out = tmp_path / "pts"
    models = "moneta:map_schedule=chunk,miras:memory=linear:bias=lp:retention=lq:q_norm=3.0,memora:chunk_size=2"
    res = demo.main([*TINY, "--jobs", "1", "--models", models, "--tasks", "mqar", "--seeds", "2", "--no-plot",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert sorted({(r["model"], r["seed"]) for r in res["results"]}) == sorted(
        (m, s) for m in models.split(",") for s in (0, 1))
    rows = {r["model"]: r for r in res["summary"]}
    assert set(rows) == set(models.split(","))
    for r in rows.values():
        per = [x for x in res["results"] if x["model"] == r["model"]]
        for L in ("12", "20"):
            accs = [x["accuracy"][L] for x in per]
            assert abs(r["accuracy"][L] - sum(accs) / 2) < 1e-12
            assert abs(r["accuracy_std"][L] - abs(accs[0] - accs[1]) / 2 ** 0.5) < 1e-12
    assert "mean ± std over 2 seeds" in printed and "±" in printed
    # the settings reach the layers
    lm = demo.build_model("memora:chunk_size=2:kl_scale=3.0", demo.Vocab(8, 8), demo.parser().parse_args(TINY), "cpu")
    layer = lm.layers[0].mixer
    assert layer.chunk_size == 2 and layer.op_kwargs["kl_scale"] == 3.0


@pytest.mark.parametrize("spec,match", [("moneta:map_schedule=chunks", "map_schedule"),
                                        ("gpt5:x=1", "unknown model"), ("moneta:q_norm", "key=value"),
                                        ("memora:kl_scale=-1", "kl_scale"), ("moneta:nope=1", "nope")])
def test_demo_bad_model_settings_fail_early(spec, match, capsys):
    with pytest.raises(SystemExit, match=match):
        demo.main(["--models", spec, "--steps", "0", "--no-plot", "--quiet"])
