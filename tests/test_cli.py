"""
The command lines of decode.py and bench.py: every bad option is one line `error: ...` naming the option and what it
allows, exit status 2, before any model loads; --show marks how each token was produced; a lossy method says so.
Run in-process (fast); one subprocess per script checks the wiring of `python decode.py`.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import artefacts
import bench
import cli
import decode
import model as nano
from chars import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent

DECODE_BAD = [
    (["--method", "confadapt@0"], "argument --method: method 'confadapt@0': TAU must be a number in (0, 1]"),
    (["--method", "confadapt@1.5"], "TAU must be a number in (0, 1]"),
    (["--method", "mtp@0"], "argument --method: method 'mtp@0': D must be an integer from 1 to 16"),
    (["--method", "mtp@abc"], "D must be an integer from 1 to 16"),
    (["--method", "mtp@100"], "D must be an integer from 1 to 16"),
    (["--method", "static@1"], "K must be an integer from 2 to 16"),
    (["--method", "beam@3"], "unknown method 'beam@3'"),
    (["--method", "beam"], "mtp@autoD"),
    (["--method", "mtp@"], "method 'mtp@': D must be an integer from 1 to 16"),
    (["--method", "ar@"], "method 'ar@': Q must be an integer from 1 to 64"),
    (["--method", "mtp@\u0663"], "D must be an integer from 1 to 16"),
    (["--method", "tree@4,2,2,1"], "separated by '-': tree@4-2-2-1"),
    (["--init_from", ""], "argument --init_from: expected smollm2"),
    (["--heads", str(ROOT)], "is a directory, not a file"),
    (["--temperature", "-1"], "argument --temperature: must be at least 0, got -1"),
    (["--temperature", "1", "--top_k", "0"], "argument --top_k: must be at least 1, got 0"),
    (["--temperature", "1", "--top_p", "1.5"], "argument --top_p: must be in (0, 1], got 1.5"),
    (["--temperature", "1", "--top_p", "0"], "argument --top_p: must be in (0, 1], got 0"),
    (["--top_k", "5"], "--top_k and --top_p shape sampling: they need --temperature > 0"),
    (["--max_new_tokens", "-5"], "argument --max_new_tokens: must be at least 1, got -5"),
    (["--max_new_tokens", "many"], "argument --max_new_tokens: expected an integer, got 'many'"),
    (["--method", "mtp", "--draft_vocab", "-5"], "argument --draft_vocab: must be at least 0, got -5"),
    (["--device", "tpu"], "argument --device: unknown device 'tpu'"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--method", "mtp", "--heads", "no/such.safetensors"], "argument --heads: no/such.safetensors: no such file"),
    (["--adapter", str(ROOT / "README.md")], "--adapter: no method here uses it (methods: ar)"),
    (["--draft_vocab", "5"], "--draft_vocab: no method here uses it"),
    (["--init_from", "no/such/folder"], "no/such/folder: no such file or folder"),
    (["--bogus"], "unrecognized arguments: --bogus"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "cuda: CUDA is not available on this machine")])

BENCH_BAD = [
    (["--methods", ""], "argument --methods: no methods given"),
    (["--methods", " , "], "argument --methods: no methods given"),
    (["--methods", "ar,beam@2"], "unknown method 'beam@2'"),
    (["--methods", "ar,confadapt@0"], "TAU must be a number in (0, 1]"),
    (["--sweep", "--taus", "0.5,0"], "argument --taus: must be in (0, 1], got 0"),
    (["--num_prompts", "0"], "argument --num_prompts: must be at least 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["--prompts", "no/such.jsonl"], "argument --prompts: no/such.jsonl: no such file"),
    (["--prompts", str(ROOT / "data")], "is a directory, not a file"),
    (["--methods", "ar,tree@4,2,2,1"], "separated by '-': tree@4-2-2-1"),
    (["--init_from", ""], "argument --init_from: expected smollm2"),
    (["--methods", "ar", "--heads", str(ROOT / "README.md")], "--heads: no method here uses it (methods: ar)"),
    (["--temperature", "nan"], "argument --temperature: must be at least 0, got nan"),
]


def expect_error(main, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, (argv, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)


@pytest.mark.parametrize("argv, message", DECODE_BAD, ids=[" ".join(a) for a, _ in DECODE_BAD])
def test_decode_bad_options(argv, message, capsys):
    expect_error(decode.main, argv, message, capsys)


@pytest.mark.parametrize("argv, message", BENCH_BAD, ids=[" ".join(a) for a, _ in BENCH_BAD])
def test_bench_bad_options(argv, message, capsys):
    expect_error(bench.main, argv, message, capsys)


def test_command_line_wiring():
    for script, argv in (("decode.py", ["--method", "mtp@0"]), ("bench.py", ["--methods", ""])):
        r = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (script, r.stderr)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        decode.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in text and "comma-separated" in text


# ----------------------------------------------------------------------------------------------------------------
# --show and the lossy label

class Letters:
    """Token t is the letter 'a' + t."""
    def decode(self, ids):
        return "".join(chr(ord("a") + t) for t in ids)


def test_render():
    text, legend = cli.render(Letters(), [0, 1, 2, 3], [0, 1, 2, 0], lossy=False, colour=False)
    assert text == "a[1:b][2:c]d" and legend == "legend: plain = main model; [d:text] = accepted draft at depth d"
    text, legend = cli.render(Letters(), [0, 1, 2], [0, 1, 6], lossy=True, colour=True)
    assert text == "a\033[32mb\033[0m\033[34mc\033[0m" and "kept mask prediction" in legend


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint with a character tokenizer, a heads file and a full-fine-tuned mask-token twin."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cfg = nano.Config(arch="llama", vocab_size=CharTokenizer().vocab_size, n_layer=1, n_head=2, n_kv_head=1,
                      n_embd=32, head_dim=16, intermediate_size=64, max_seq_len=128)
    m = nano.Transformer(cfg)
    artefacts.save_checkpoint(root / "model", m, CharTokenizer())
    m.add_heads(2, init="random")
    artefacts.save_heads(root / "heads.safetensors", m)
    tokenizer, masked = CharTokenizer(), nano.Transformer(cfg)
    masked.add_mask_tokens(1)
    tokenizer.add_special("<mtp>")
    artefacts.save_checkpoint(root / "masked", masked, tokenizer, extra={"train_args": {"init_from": str(root / "model")}})
    return root


def test_show_marks_drafts(checkpoint, capsys):
    decode.main(["--init_from", str(checkpoint / "model"), "--method", "mtp@2", "--heads",
                 str(checkpoint / "heads.safetensors"), "--raw", "--prompt", "hello", "--max_new_tokens", "12",
                 "--show"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "legend: plain = main model; [d:text] = accepted draft at depth d"
    assert lines[-1].startswith("--- mtp@2: 12 tokens")


def test_lossy_line(checkpoint, capsys):
    decode.main(["--init_from", str(checkpoint / "masked"), "--method", "static@3", "--raw", "--prompt", "hello",
                 "--max_new_tokens", "6", "--show"])
    lines = capsys.readouterr().out.splitlines()
    assert "kept mask prediction" in lines[-3] and lines[-1].startswith("LOSSY: static@3")
    decode.main(["--init_from", str(checkpoint / "masked"), "--method", "verified@3", "--raw", "--prompt", "hi",
                 "--max_new_tokens", "4"])
    assert "LOSSY" not in capsys.readouterr().out


def test_render_keeps_split_characters_whole():
    class Bytes:
        """Token t is byte t of UTF-8."""
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")
    e_acute = list("é".encode())
    text, _ = cli.render(Bytes(), [104, *e_acute, 104], [0, 1, 2, 0], lossy=False, colour=False)
    assert text == "h[2:é]h"
