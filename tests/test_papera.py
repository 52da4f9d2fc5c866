"""
Paper A's measurement plumbing: the Wilson interval on accuracies, ConfAdapt's k_max override (confadapt@TAU:K) and
bench's tau x k_max sweep on a tiny random model, config/papera_table.py on a fake bench JSON, and
config/papera_synthmath.sh's option.
"""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

import bench
import decode
import quality
import report

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("papera_table", ROOT / "config" / "papera_table.py")
papera_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(papera_table)


@pytest.mark.parametrize("successes, n, low, high", [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (81, 100, 0.7222, 0.8749)])
def test_wilson_known_values(successes, n, low, high):
    lo, hi = quality.wilson(successes, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_of_nothing_is_none():
    assert quality.wilson(0, 0) is None


def test_accuracy_interval_in_results_and_table():
    m, tokenizer, options = bench.tiny_setup("cpu", torch.float32, seed=0)
    prompts = [{"prompt": "1+1=", "answer": 2}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "hi", "answer": "x"}]
    res = bench.run(m, tokenizer, ["ar"], prompts, max_new_tokens=4, options=options)
    r = res["methods"]["ar"]
    assert r["scored"] == 2                 # the non-numeric answer is not scored
    assert r["accuracy_ci95"] == quality.wilson(round(r["accuracy"] * 2), 2)
    lo, hi = r["accuracy_ci95"]
    assert f"{lo:.3f}-{hi:.3f}" in report.table(res) and "acc 95%" in report.table(res)


def test_confadapt_k_max_override():
    m, _, options = bench.tiny_setup("cpu", torch.float32, seed=0)
    options = {**options, "k_max": 8}
    assert decode.make_strategy(m, "confadapt@0.9", 32, **options).k == 8      # the model's k_max
    strategy = decode.make_strategy(m, "confadapt@0.9:3", 32, **options)
    assert strategy.k == 3 and strategy.query_len == 5 and strategy.tau == 0.9
    for bad in ("confadapt@0.9:1", "confadapt@0.9:17", "confadapt@0.9:x"):
        with pytest.raises(ValueError, match="K \\(k_max\\)"):
            decode.Method.parse(bad)


def test_k_max_sweep(tmp_path, capsys):
    res = bench.main(["--tiny", "--methods", "ar", "--sweep", "--taus", "0.5,0.9", "--k_maxes", "2,4",
                      "--num_prompts", "1", "--max_new_tokens", "6", "--out", str(tmp_path)])
    names = ["confadapt@0.5:2", "confadapt@0.9:2", "confadapt@0.5:4", "confadapt@0.9:4"]
    assert list(res["methods"]) == ["ar"] + names
    for name in names:
        r = res["methods"][name]
        assert r["k_max"] == int(name[-1]) and len(r["acceptance_rate"]) == r["k_max"] - 1
    md = (tmp_path / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| method | k_max | tau | tok/fwd |") and "acc 95%" in md[0]
    assert [line.split(" | ")[0][2:] for line in md[2:]] == ["ar"] + names
    assert [line.split(" | ")[1] for line in md[3:]] == ["2", "2", "4", "4"]
    assert "confadapt@0.9:4" in capsys.readouterr().out          # the table shows the long names whole


def test_k_maxes_needs_sweep(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--k_maxes", "4"])
    assert e.value.code == 2 and "--k_maxes: only with --sweep" in capsys.readouterr().err


def fake_result(accuracy, n=100, **methods):
    row = dict(lossy=False, tokens_per_forward=1.0, speedup=1.0, exact_match=1.0, k_max=None)
    return {"methods": {name: {**row, **m, "accuracy": m.get("accuracy", accuracy),
                               "accuracy_ci95": quality.wilson(round(m.get("accuracy", accuracy) * n), n)}
                        for name, m in methods.items()}}


def test_papera_table(tmp_path):
    (tmp_path / "bench_teacher.json").write_text(json.dumps({**fake_result(0.8, ar={}), "device": "cpu"}))
    gated = fake_result(0.8, ar={}, **{
        "static@3": dict(lossy=True, tokens_per_forward=2.9, speedup=2.5, accuracy=0.6),
        "confadapt@0.9": dict(lossy=True, tokens_per_forward=3.4, speedup=3.0, accuracy=0.76, k_max=8)})
    (tmp_path / "bench_gated.1.json").write_text(json.dumps(gated))
    sweep = fake_result(0.5, ar={}, **{"confadapt@0.9:16": dict(lossy=True, k_max=16)})
    (tmp_path / "bench_gated.2.json").write_text(json.dumps(sweep))    # a second part, merged
    papera_table.main([str(tmp_path)])
    md = (tmp_path / "papera_table.md").read_text()
    assert "Teacher (ar): accuracy 0.800" in md and "side by side on cpu," in md    # the bench's device
    rows = {line.split(" | ")[1]: line.split(" | ") for line in md.splitlines() if line.startswith("| gated")}
    assert list(rows) == ["ar", "static@3 (LOSSY)", "confadapt@0.9 (LOSSY)", "confadapt@0.9:16 (LOSSY)"]
    assert rows["confadapt@0.9 (LOSSY)"][2:] == ["<=8", "-", "3.40", "0.760", report.interval(gated["methods"]
                                                 ["confadapt@0.9"]), "3.00x", "1.00", "+5.0%", "+5.0%",
                                                 "64.1@3.3 / 83.6@3.1 |"]
    assert rows["static@3 (LOSSY)"][2] == "3" and rows["static@3 (LOSSY)"][-3:] == ["+25.0%", "+25.0%", " |"]
    assert rows["ar"][5] == "0.800" and rows["ar"][-1] == "66.0 / 89.1 |"     # the first part's ar is kept
    assert rows["confadapt@0.9:16 (LOSSY)"][2] == "<=16"
    assert "| teacher | ar |" in md


@pytest.mark.parametrize("files, message", [({}, "no bench_teacher.json"),
                                            ({"bench_teacher.json": "{oops"}, "not a bench.py JSON result")])
def test_papera_table_errors(tmp_path, capsys, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as e:
        papera_table.main([str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_papera_script_refuses_an_unknown_option():
    """Before it writes anything: the scale is the script's one option."""
    run = subprocess.run(["bash", "config/papera_synthmath.sh", "--gpu"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: unknown option --gpu (expected --cpu, --smoke or nothing)\n"
