"""
Issue 24, on the CPU with tiny models. No silent NaN: options, losses, metrics, weights. Checkpoint
swaps recovered by every reader; one train.py run per --out; clear one-line messages; progress.

And ten properties whose wrong lines no test noticed: the strategies' declared query length,
per-rank loss streams (in test_distributed.py), metric averaging over ranks, the checkpoint swap
(twice), which files train.py owns, Paper A's regions, bench's speedup and bf16 reference, and the
prefill's share of tokens per forward.
"""

import fcntl
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import artefacts
import bench
import decode
import distill
import load
import parallel
import report
import train
import train_options
from chars import CharTokenizer
from helpers import SMALL, default_init, read_log, run_cli
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models run on one thread

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from data.prepare import main as prepare
    out = tmp_path_factory.mktemp("data") / "synth"
    prepare(["synthmath", "--out", str(out), "--n_train", "300", "--n_val", "20", "--n_test", "5"])
    return out


def tiny(heads=0, vocab=40, max_seq_len=256, seed=0):
    return default_init(vocab, heads, seed, max_seq_len=max_seq_len).eval()


def steps_of(out):
    return [r["step"] for r in read_log(out)]


# ------------------------------------------------------------------------------------------------
# silent wrong results

@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--lr", "nan"), ("--beta", "inf"),
                                           ("--grad_clip", "inf"), ("--alpha", "nan"),
                                           ("--peak_tflops", "inf")])
def test_train_refuses_non_finite_float_options(option, value, synth, tmp_path, capsys):
    status, err = run_cli(["--data", synth, "--out", tmp_path / "run", *SMALL, option, value],
                          capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"{option} {value}: must be a finite number" in err, err
    assert not (tmp_path / "run").exists()


def test_train_refuses_non_finite_values_from_a_config_file(synth, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text('{"alpha": Infinity}')               # Python's json reads float("inf")
    status, err = run_cli(["--config", config, "--data", synth, "--out", tmp_path / "run",
                           *SMALL], capsys)
    assert status == 2 and "--alpha inf: must be a finite number" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "inf"], "--temperature: must be a finite number, got inf"),
    (["--temperature", "nan"], "--temperature: must be at least 0, got nan"),
    (["--temperature", "1", "--top_p", "nan"], "--top_p: must be in (0, 1], got nan")])
def test_decode_refuses_non_finite_numbers_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as e:          # refused before the missing model is noticed
        decode.main(["--init_from", "no/such/model", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_a_run_whose_loss_turns_non_finite_stops_keeping_the_last_good_checkpoint(
        synth, tmp_path, capsys, monkeypatch):
    real, calls = train.loss_fn, []

    def diverging(*args, **kwargs):               # the loss of step 3 is NaN, as after a huge step
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 3 else loss), metrics
    monkeypatch.setattr(train, "loss_fn", diverging)
    out = tmp_path / "run"
    status, err = run_cli(["--data", synth, "--out", out, *SMALL, "--max_steps", "6",
                           "--save_every", "2"], capsys)
    last = err.splitlines()[-1]                   # after the progress bar
    assert status == 2 and err.count("error: ") == 1, err
    assert last.startswith("error: step 3: the loss is nan") and f"{out} keeps step 2" in last
    assert train_options.checkpoint_args(out)["step"] == 2
    model, _ = load.load(out)                     # finite weights: they load
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(steps_of(out)) == 2                # the non-finite step is not logged as a result


def test_agreement_and_accuracy_are_nan_on_non_finite_logits():
    """Two NaN argmaxes agree; a rate over them must not read as 1.0 (issue 24: `agree1 1.000`)."""
    m = tiny(heads=2)
    idx = torch.randint(0, 40, (2, 16))
    rates = [f"{k}{d}" for k in ("acc", "agree") for d in (1, 2)]
    _, good = distill.mtp_loss(m, idx)
    assert all(0 <= good[key] <= 1 for key in rates)
    with torch.no_grad():
        m.lm_head.weight.fill_(float("nan"))
    _, bad = distill.mtp_loss(m, idx)
    assert all(torch.tensor(bad[key]).isnan() for key in rates), bad
    student, teacher = tiny(), tiny()
    ids = student.add_mask_tokens(1)
    teacher.add_mask_tokens(1)
    packed = distill.pack_batch(torch.randint(0, 40, (2, 33)), 3, 2, ids)
    with torch.no_grad():
        student.lm_head.weight.fill_(float("nan"))
    _, metrics = distill.student_forced_loss(student, teacher, *packed, n_real_vocab=40)
    shown = {k: v for k, v in metrics.items() if k.startswith(("agree", "acc"))}
    assert shown and all(torch.tensor(v).isnan() for v in shown.values()), metrics


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_model_weights_with_nan_or_inf_are_refused_naming_the_tensor(bad, tmp_path, capsys):
    m = tiny()
    with torch.no_grad():
        m.blocks[1].mlp.up_proj.weight[3, 5] = bad
    artefacts.save_checkpoint(tmp_path / "ckpt", m, CharTokenizer())
    named = r"model\.safetensors: tensor blocks\.1\.mlp\.up_proj\.weight holds NaN or Inf"
    with pytest.raises(ValueError, match=named):
        load.load(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        decode.main(["--init_from", str(tmp_path / "ckpt"), "--device", "cpu",
                     "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "blocks.1.mlp.up_proj.weight" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# resume and concurrent runs

def test_resume_finishes_an_interrupted_checkpoint_swap(synth, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--data", synth, "--out", out, *SMALL, "--max_steps", "2"], capsys)[0] == 0
    out.rename(tmp_path / ".run.old")             # a crash between the swap's two renames
    assert run_cli(["--out", out, "--resume", "--max_steps", "3"], capsys)[0] == 0
    assert steps_of(out) == [1, 2, 3] and train_options.checkpoint_args(out)["step"] == 3


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(
        synth, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data", synth, "--out", out, *SMALL, "--max_steps", "2", "--save_every", "1"]
    real, second = train.save, []

    def save_with_a_second_run(*args, **kwargs):  # while the first run is under way
        if not second:
            second.append(train.cli([str(a) for a in [*argv, "--overwrite"]]))
        real(*args, **kwargs)
    monkeypatch.setattr(train, "save", save_with_a_second_run)
    status, err = run_cli(argv, capsys)
    assert status == 0 and second == [2], err
    assert err.count("error: ") == 1, err
    assert f"in use by another train.py run (pid {os.getpid()}" in err, err
    assert steps_of(out) == [1, 2] and train_options.checkpoint_args(out)["step"] == 2
    monkeypatch.setattr(train, "save", real)
    lock = tmp_path / "run.lock"
    assert not lock.exists()                      # released and removed at the end
    lock.write_text("4194304\n")                  # a crashed run's file: nobody holds its lock
    assert run_cli(["--out", out, "--resume", "--max_steps", "3"], capsys)[0] == 0
    with open(lock, "w") as held:                 # another process's lock (flock: per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("12345\n")
        held.flush()
        status, err = run_cli(["--out", out, "--resume", "--max_steps", "4"], capsys)
    assert status == 2 and "(pid 12345" in err and err.count("\n") == 1, err
    assert train_options.checkpoint_args(out)["step"] == 3


def test_resume_below_the_checkpoint_step_says_so(synth, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real, calls = train.loss_fn, []

    def killed(*args, **kwargs):                  # the process dies during step 3 of 100
        calls.append(1)
        if len(calls) == 3:
            raise OSError("killed")
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "loss_fn", killed)
    run_cli(["--data", synth, "--out", out, *SMALL, "--max_steps", "100", "--save_every", "2"],
            capsys)
    assert train_options.checkpoint_args(out)["step"] == 2
    status, err = run_cli(["--out", out, "--resume", "--max_steps", "1"], capsys)
    assert status == 2 and "--max_steps 1: below step 2 of the checkpoint" in err, err
    assert "finished" not in err
    status, err = run_cli(["--out", out, "--resume", "--max_steps", "2"], capsys)
    assert status == 2 and "stopped at step 2" in err and "finished" not in err, err


# ------------------------------------------------------------------------------------------------
# messages and progress

@pytest.mark.parametrize("argv, message", [
    (["--min_steps", "5", "--max_steps", "2"],
     "--min_steps 5, --max_steps 2: need 1 <= --min_steps <= --max_steps"),
    (["--min_steps", "0"], "--min_steps 0"),
    (["--max_number", "1"], "--max_number 1: must be at least 2"),
    (["--n_train", "0", "--n_val", "0", "--n_test", "0"],
     "--n_train 0, --n_val 0, --n_test 0: need counts"),
    (["--n_val", "-1"], "--n_val -1"),
])
def test_synthmath_bad_knobs_are_one_line_errors(argv, message, tmp_path):
    from data.prepare import main as prepare
    with pytest.raises(ValueError) as e:
        prepare(["synthmath", "--out", str(tmp_path / "d"), "--n_train", "20", "--n_val", "2",
                 "--n_test", "2", *argv])
    assert message in str(e.value)
    assert not (tmp_path / "d").exists()


def test_prepare_exits_2_on_a_user_error(tmp_path):
    done = subprocess.run([sys.executable, "data/prepare.py", "synthmath", "--out",
                           str(tmp_path / "d"), "--min_steps", "5", "--max_steps", "2"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: --min_steps 5")
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("n", [0, 7, 999, 12_345, 99_999, 100_000, 3_456_789, 134_515_008])
def test_parameter_counts_read_back_within_5_percent(n):
    shown = train.count(n)
    value = float(shown[:-1]) * 1e6 if shown.endswith("M") else int(shown.replace(",", ""))
    assert abs(value - n) <= 0.05 * n, shown


def test_training_console_shows_tokens_per_second_and_mfu(synth, tmp_path, capsys):
    status, err = run_cli(["--data", synth, "--out", tmp_path / "run", *SMALL, "--max_steps", "2",
                           "--peak_tflops", "1"], capsys)
    assert status == 0 and "tok/s=" in err and "mfu=" in err, err


def test_a_long_prefill_says_what_is_happening(tmp_path, capsys):
    tokenizer = CharTokenizer()
    model = tiny(vocab=tokenizer.vocab_size, max_seq_len=4096)
    artefacts.save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    common = ["--init_from", str(tmp_path / "ckpt"), "--device", "cpu", "--raw",
              "--max_new_tokens", "1"]
    decode.main([*common, "--prompt", "a" * decode.LONG_PREFILL])
    assert f"prefill: {decode.LONG_PREFILL:,} prompt tokens" in capsys.readouterr().err
    decode.main([*common, "--prompt", "a" * 10])
    assert "prefill" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# properties the suite did not guard (issue 24, "Tests that catch what they do not today")

@pytest.fixture(scope="module")
def bench_model():
    return bench.tiny_setup("cpu", torch.float32, seed=0)


def step_query_lengths(strategy, model, run):
    """The query length of every forward the strategy makes in its steps (not in its prefill)
    while run() runs."""
    seen, stepping = [], []
    real_forward, real_step = model.forward, strategy.step

    def forward(idx, *args, **kwargs):
        if stepping:
            seen.append(idx.size(1))
        return real_forward(idx, *args, **kwargs)

    def step(*args, **kwargs):
        stepping.append(1)
        try:
            return real_step(*args, **kwargs)
        finally:
            stepping.pop()
    strategy.forward, strategy.step = forward, step
    run()
    return seen


def decode_once(m, tokenizer, strategy, text, n):
    return lambda: decode.generate(m, [tokenizer.encode(text)], n, method=strategy)


@pytest.mark.parametrize("method", ["ar", "ar@3", "mtp@1", "mtp@3", "tree@2x2", "tree@auto5",
                                    "verified@3", "static@3", "confadapt@0.5"])
def test_declared_query_length_is_what_each_step_feeds(method, bench_model):
    """ar@Q, padded to a method's declared query_len, is its bf16 reference: the declaration must
    be the length of the forwards the method makes (item 1)."""
    m, tokenizer, options = bench_model
    strategy = decode.make_strategy(m, method, 64, **options)
    seen = step_query_lengths(strategy, m, decode_once(m, tokenizer, strategy, "Hello there", 24))
    assert set(seen) == {strategy.query_len}, (method, set(seen), strategy.query_len)


def test_bf16_reference_is_ar_at_the_query_length_of_the_verify_forward():
    """In bf16 a lossless method's exact_match is measured against ar padded to the length of its
    own verify forwards (item 9: not plain ar), whose rounding is the method's: it matches."""
    m, tokenizer, options = bench.tiny_setup("cpu", torch.bfloat16, seed=0)
    prompts = ["What is 2+2?", "Hello there"]
    res = bench.run(m, tokenizer, ["mtp@3", "tree@2x2"], prompts, 16, options=options,
                    warmup=0)["methods"]
    for method in ("mtp@3", "tree@2x2"):
        strategy = decode.make_strategy(m, method, 64, **options)
        fed = step_query_lengths(strategy, m, decode_once(m, tokenizer, strategy, prompts[0], 16))
        assert res[method]["reference"] == f"ar@{max(fed)}", (method, res[method], set(fed))
        assert res[method]["exact_match"] == 1.0


def test_speedup_is_how_many_times_faster_than_ar(bench_model, monkeypatch):
    """Item 8: a method that takes half ar's time for the same tokens has speedup 2 (not 0.5)."""
    m, tokenizer, options = bench_model
    real_generate, clock = decode.generate, [0.0]

    def generate(model, prompts, n, *args, method="ar", **kwargs):   # ar: 2 s a call, mtp@3: 1 s
        out = real_generate(model, prompts, n, *args, method=method, **kwargs)
        clock[0] += 2.0 if isinstance(method, decode.Autoregressive) else 1.0
        return out
    monkeypatch.setattr(decode, "generate", generate)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    res = bench.run(m, tokenizer, ["ar", "mtp@3"], ["What is 2+2?", "Hello there"], 12,
                    options=options, warmup=0)["methods"]
    assert res["mtp@3"]["tokens"] == res["ar"]["tokens"] and res["mtp@3"]["exact_match"] == 1.0
    assert res["mtp@3"]["speedup"] == pytest.approx(2.0)
    assert res["ar"]["speedup"] == pytest.approx(1.0)
    assert res["mtp@3"]["speedup_mtp1"] is None       # Paper B's reference did not run


def test_speedup_over_mtp1_is_paper_bs_reference(bench_model, monkeypatch):
    """Beside ar, bench measures every method against mtp@1 (Paper B's one-head MTP) when it ran:
    mtp@3 taking half mtp@1's time for the same tokens is 2x over it, ar taking twice 0.5x."""
    m, tokenizer, options = bench_model
    real_generate, clock = decode.generate, [0.0]
    cost = {1: 4.0, 2: 2.0, 4: 1.0}   # seconds a call, by query length: ar 1, mtp@1 2, mtp@3 4

    def generate(model, prompts, n, *args, method="ar", **kwargs):
        out = real_generate(model, prompts, n, *args, method=method, **kwargs)
        clock[0] += cost[method.query_len]
        return out
    monkeypatch.setattr(decode, "generate", generate)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    res = bench.run(m, tokenizer, ["ar", "mtp@1", "mtp@3"], ["What is 2+2?", "Hello there"], 12,
                    options=options, warmup=0)
    rows = res["methods"]
    assert rows["mtp@3"]["speedup_mtp1"] == pytest.approx(2.0)
    assert rows["ar"]["speedup_mtp1"] == pytest.approx(0.5)
    assert rows["mtp@3"]["speedup"] == pytest.approx(4.0)
    assert "speedup over mtp@1: ar 0.50x | mtp@3 2.00x" in report.table(res)


@pytest.mark.parametrize("method, k", [("static@4", 4), ("confadapt@0.5", 1), ("mtp@3", 1),
                                       ("ar", 1)])
def test_tokens_per_forward_counts_no_prefill_token_beyond_the_output(method, k, bench_model):
    """Item 10: the prefill's tokens are left out of tokens per forward, but never more than the
    output holds: an output no longer than what the prefill yields (k) is the prefill's alone."""
    m, tokenizer, options = bench_model
    prompt = tokenizer.encode("Why is the sky blue?")
    for n in range(1, 9):
        stats = decode.Stats()
        out = decode.generate(m, [prompt], n, method=method, stats=stats, **options)[0]
        assert stats.tokens == len(out), (n, stats)
        assert 0 <= stats.prefill_tokens <= stats.tokens, (n, stats)
        if stats.forwards == stats.prefills:      # nothing but the prefill ran
            assert stats.prefill_tokens == stats.tokens, (n, stats)
            assert stats.tokens_per_forward == 0, (n, stats)
        if n <= k:
            assert stats.forwards == stats.prefills, (n, stats)


def test_parallel_average_is_over_the_ranks_that_report_each_key(monkeypatch):
    """Item 3: mask mode's agree{j} exist only on ranks whose k reached j: their mean is over
    those ranks."""
    par = parallel.Parallel.__new__(parallel.Parallel)
    par.world_size = 3
    reports = [{"loss": 1.0, "agree3": 0.5}, {"loss": 2.0}, {"loss": 6.0, "agree3": 0.25}]

    def all_gather_object(every, _):
        every[:] = reports
    monkeypatch.setattr(parallel.dist, "all_gather_object", all_gather_object)
    assert par.average(reports[0]) == {"loss": 3.0, "agree3": 0.375}


def save_tiny(folder, seed):
    m = tiny(vocab=CharTokenizer().vocab_size, seed=seed)
    artefacts.save_checkpoint(folder, m, CharTokenizer())
    return m


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_failed_save_after_a_crashed_swap_keeps_the_only_checkpoint(tmp_path):
    """Item 4: with the checkpoint left in .NAME.old by a crash, a save that then fails must leave
    it readable."""
    folder = tmp_path / "ckpt"
    first = save_tiny(folder, seed=1)
    folder.rename(tmp_path / ".ckpt.old")

    class Broken(CharTokenizer):
        def save(self, where):
            raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        artefacts.save_checkpoint(folder, tiny(vocab=first.cfg.vocab_size, seed=2), Broken())
    assert same_weights(load.load(folder)[0], first)


def test_recovery_never_replaces_a_complete_checkpoint_with_the_old_one(tmp_path):
    """Item 5: a crash after the swap's second rename leaves the new checkpoint in place and the
    old one in .NAME.old: readers see the new one, and the next save goes through."""
    folder, old = tmp_path / "ckpt", tmp_path / ".ckpt.old"
    second = save_tiny(folder, seed=2)
    save_tiny(tmp_path / "first", seed=1)
    (tmp_path / "first").rename(old)
    assert same_weights(load.load(folder)[0], second)
    third = save_tiny(folder, seed=3)
    assert same_weights(load.load(folder)[0], third) and not old.exists()


@pytest.mark.parametrize("tokenizer", ["chars", "bpe"])
def test_train_owns_exactly_the_files_a_checkpoint_holds(tokenizer, tmp_path, tiny_bpe):
    """Item 6: written_by_checkpoint is true of every file save_checkpoint writes and of nothing
    a user would put beside them (a `tokens.txt` is not train.py's to replace)."""
    if tokenizer == "chars":
        tok = CharTokenizer()
    else:
        (tmp_path / "hf").mkdir()
        tiny_bpe.save(str(tmp_path / "hf" / "tokenizer.json"))
        (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
        tok = Tokenizer.from_hf(tmp_path / "hf")
    artefacts.save_checkpoint(tmp_path / "ckpt", tiny(vocab=max(40, tok.vocab_size)), tok,
                         train_state={"step": 0})
    written = os.listdir(tmp_path / "ckpt")
    assert "train_state.pt" in written, written
    assert all(train_options.written_by_checkpoint(n) for n in written), written
    users = ["tokens.txt", "tok.json", "token_ids.npy", "notes.txt", "model.pt", "config.yaml",
             "train_state.pt.bak", "model.safetensors.old"]
    assert not [n for n in users if train_options.written_by_checkpoint(n)]


def test_mask_regions_never_overlap_in_what_they_predict():
    """Item 7: each region's k slots predict tokens a+1..a+k of its anchor a, and no token is
    predicted by two regions, however the anchors fall (little slack makes neighbours touch)."""
    for k in (2, 3, 5):
        for n_regions in (1, 3, 4):
            N = n_regions * k + 1 + 2               # two tokens of slack
            tokens = torch.arange(100, 100 + N)     # a token's id tells its position
            for seed in range(60):
                g = torch.Generator().manual_seed(seed)
                r = distill.pack_regions(tokens, k, n_regions, [7], g)
                predicted = r.targets.flatten().tolist()
                assert len(predicted) == len(set(predicted)), (k, n_regions, seed, r.targets)
                anchors = r.pos[r.slots[:, 0]]      # the anchor's slot is the real token itself
                want = anchors[:, None] + 1 + torch.arange(k) + 100
                assert torch.equal(r.targets, want), (k, n_regions, seed)


def test_prepare_reads_the_tokenizer_of_a_checkpoint_left_mid_swap(tmp_path):
    """Every reader of a checkpoint folder finishes a crashed swap first: data/prepare.py too."""
    from data.prepare import main as prepare
    save_tiny(tmp_path / "ckpt", seed=0)
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")
    (tmp_path / "t.txt").write_text("some text to tokenize\n" * 20)
    prepare(["text", "--file", str(tmp_path / "t.txt"), "--tokenizer", str(tmp_path / "ckpt"),
             "--out", str(tmp_path / "d")])
    assert (tmp_path / "d" / "meta.json").is_file() and (tmp_path / "ckpt").is_dir()
