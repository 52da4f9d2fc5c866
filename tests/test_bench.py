"""
bench.py and the decoding setup it shares with decode.py, on tiny random models (CPU, no weights): exact match
measured against an independent greedy `ar` run, transformers' generate side by side, the NLL label of a fine-tuned
model whose original is missing, the draft vocabulary, the table's columns, and the prompts file's errors.
"""

import json

import pytest
import torch

import artefacts
import bench
import decode
import hf_compare
import load
import model as nano
import quality
import report
from chars import CharTokenizer
from data.dataset import FORMAT, fingerprint


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models run on one thread


@pytest.fixture(scope="module")
def tiny():
    return bench.tiny_setup("cpu", torch.float32, seed=0)


PROMPTS = ["What is 2+2?", "Hello there, how are you?", "Name a colour.", "Why is the sky blue?"]


def greedy(m, tokenizer, prompts, n, method="ar", **options):
    return [decode.generate(m, [tokenizer.encode(p)], n, stop_ids=tokenizer.stop_ids, method=method, **options)[0]
            for p in prompts]


def test_exact_match_against_independent_greedy_ar(tiny):
    m, tokenizer, options = tiny
    ar = greedy(m, tokenizer, PROMPTS, 12)
    static = greedy(m, tokenizer, PROMPTS, 12, "static@3", **options)
    want = sum(s == a for s, a in zip(static, ar)) / len(PROMPTS)
    assert want < 1      # a lossy method that differs: a comparison with itself would give 1.0
    with_ar = bench.run(m, tokenizer, ["static@3", "ar"], PROMPTS, 12, options=options, warmup=0)["methods"]
    alone = bench.run(m, tokenizer, ["static@3"], PROMPTS, 12, options=options, warmup=0)["methods"]
    assert with_ar["static@3"]["exact_match"] == alone["static@3"]["exact_match"] == want
    # sampling: the reference is still plain greedy ar, so sampled ar itself need not match it
    res = bench.run(m, tokenizer, ["ar"], PROMPTS, 12, options=options, temperature=1.0, seed=3, warmup=0)
    gen = torch.Generator().manual_seed(3)
    sampled = [decode.generate(m, [tokenizer.encode(p)], 12, 1.0, stop_ids=tokenizer.stop_ids, generator=gen)[0]
               for p in PROMPTS]
    assert res["methods"]["ar"]["exact_match"] == sum(s == a for s, a in zip(sampled, ar)) / len(PROMPTS) < 1


def test_bench_runs_every_method(tiny):
    m, tokenizer, options = tiny
    prompts = [{"prompt": "what is 2+2?", "answer": "4"}, {"prompt": "hello there", "answer": None}, "a plain one"]
    methods = bench.run(m, tokenizer, ["ar", "mtp@3", "verified@3", "static@3"], prompts, max_new_tokens=16,
                        options=options)["methods"]
    assert methods["mtp@3"]["exact_match"] == methods["verified@3"]["exact_match"] == 1.0
    assert len(methods["mtp@3"]["acceptance_rate"]) == 3
    assert methods["static@3"]["lossy"] and not methods["mtp@3"]["lossy"]
    assert methods["static@3"]["tokens_per_forward"] > 1.0
    assert methods["ar"]["nll"] == pytest.approx(methods["mtp@3"]["nll"])
    assert methods["ar"]["accuracy"] is not None   # one prompt carries a numeric answer


def test_hf_agrees_with_ar(tiny):
    pytest.importorskip("transformers")
    m, tokenizer, options = tiny
    hf, why = hf_compare.hf_model(m, "tiny")
    assert why is None
    res = bench.run(m, tokenizer, ["ar", "hf"], PROMPTS[:3], 16, options=options, warmup=0, hf=hf)["methods"]
    assert res["hf"]["exact_match"] == 1.0 and res["hf"]["implementation"] == "transformers"
    assert res["hf"]["tokens_per_forward"] is None and "(transformers)" in report.table(
        {**bench.run(m, tokenizer, ["hf"], PROMPTS[:1], 4, warmup=0, hf=hf), "notes": []})


def test_hf_same_logits_untied_scaled_rope():
    """Every number of the config reaches transformers: untied head, rope_theta, llama3 scaling, GQA, a mask token."""
    pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = nano.Config(arch="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                      intermediate_size=64, max_seq_len=256, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    m = nano.Transformer(cfg)
    with torch.no_grad():
        for w in m.parameters():
            w.normal_(1.0 if w.dim() == 1 else 0.0, 0.3)
    m.add_mask_tokens(1)
    m.eval()
    hf, why = hf_compare.hf_model(m, "tiny")
    ids = torch.randint(0, 50, (1, 200))
    with torch.no_grad():
        ours, theirs = m(ids)[..., :50], hf(ids).logits
    assert why is None and theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_hf_skipped_without_transformers(tiny, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)   # import transformers -> ImportError
    hf, why = hf_compare.hf_model(tiny[0], "tiny")
    assert hf is None and "transformers is not installed" in why


def test_table_columns_stay_put():
    row = dict(implementation="nanoMTP", lossy=False, tok_s=1.0, speedup=1.0, tokens_per_forward=1.0, exact_match=1.0,
               nll=0.5, accuracy=None, ttft_ms=1.0, wall_s=1.0)
    res = {"num_prompts": 1, "max_new_tokens": 4, "temperature": 0.0, "device": "cpu", "dtype": "float32",
           "nll_key": "nll", "notes": [], "methods": {
               "confadapt@0.9": {**row, "acceptance_rate": [0.5] * 15},
               "mtp@2": {**row, "acceptance_rate": [0.5] * 2}, "ar": {**row, "acceptance_rate": []}}}
    lines = report.table(res).splitlines()[:4]
    assert len({len(line) for line in lines}) == 1, lines   # every column ends where the header's does
    assert " ..." in lines[1]


def test_table_sets_each_method_against_the_bare_forward_of_its_query_length():
    """On a GPU bench measures the model's bare forward per query length; each method's ms per forward is printed
    against the one of its own query length, and with no bare forward (the CPU) the line is left out."""
    row = dict(implementation="nanoMTP", lossy=False, tok_s=1.0, speedup=1.0, tokens_per_forward=1.0, exact_match=1.0,
               nll=0.5, accuracy=None, ttft_ms=1.0, wall_s=1.0, acceptance_rate=[])
    res = {"num_prompts": 1, "max_new_tokens": 4, "temperature": 0.0, "device": "cuda:0", "dtype": "bfloat16",
           "nll_key": "nll", "notes": [], "bare_forward_ms": {1: 3.0, 4: 3.5}, "methods": {
               "ar": {**row, "ms_per_forward": 3.2, "query_len": 1},
               "mtp@3": {**row, "ms_per_forward": 5.0, "query_len": 4}}}
    assert "ar 3.20 / 3.00 (0.94) | mtp@3 5.00 / 3.50 (0.70)" in report.table(res)
    assert "bare forward" not in report.table({**res, "bare_forward_ms": {}})


# ----------------------------------------------------------------------------------------------------------------
# the decoding setup: only what the methods use, the draft vocabulary, the NLL judge

def tiny_checkpoint(folder, mask_tokens=0, train_args=None):
    torch.manual_seed(0)
    tokenizer = CharTokenizer()
    cfg = nano.Config(arch="llama", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                      head_dim=16, intermediate_size=64, max_seq_len=128)
    m = nano.Transformer(cfg)
    if mask_tokens:
        ids = m.add_mask_tokens(mask_tokens)
        assert [tokenizer.add_special("<mtp>")] == ids
    artefacts.save_checkpoint(folder, m, tokenizer, extra={"train_args": train_args} if train_args else None)
    return m


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint, a heads file listing 30 token ids by frequency, and one listing none."""
    root = tmp_path_factory.mktemp("setup")
    m = tiny_checkpoint(root / "model")
    m.add_heads(1, init="random")
    artefacts.save_heads(root / "heads.safetensors", m, draft_vocab=torch.arange(30).flip(0))
    artefacts.save_heads(root / "heads_plain.safetensors", m)
    return root


def test_setup_attaches_only_what_methods_use(checkpoint):
    heads = [checkpoint / "heads.safetensors"]
    m = load.load_for(checkpoint / "model")[0]
    assert len(m.heads) == 0
    m, _, options = load.load_for(checkpoint / "model", heads=heads)
    assert len(m.heads) == 1 and quality.nll_judge(checkpoint / "model", m, "cpu", torch.float32) is m


def test_an_ungated_adapter_is_judged_by_the_base_model(tmp_path):
    """An ungated adapter moves next-token predictions: NLL is measured under the base model
    alone, never under the model with the adapter, and a gated one judges itself."""
    for gated in (False, True):
        base = tiny_checkpoint(tmp_path / f"base{gated}")
        base.add_mask_tokens(1)
        base.add_lora(4, gated=gated)
        artefacts.save_mask_adapter(tmp_path / f"a{gated}.safetensors", base, meta={"k_max": 4})
        m = load.load_for(tmp_path / f"base{gated}", adapter=tmp_path / f"a{gated}.safetensors")[0]
        judge = quality.nll_judge(tmp_path / f"base{gated}", m, "cpu", torch.float32)
        assert (judge is m) == gated
        assert gated or (judge.cfg.mask_token_ids == [] and judge.cfg.lora_rank == 0)


def test_draft_vocab(checkpoint):
    def draft_ids(n, file="heads.safetensors"):
        return load.load_for(checkpoint / "model", heads=[checkpoint / file], draft_vocab=n)[2].get(
            "draft_ids")
    assert draft_ids(None).tolist() == list(range(29, -1, -1))   # the default is capped by what the file lists
    assert draft_ids(0) is None                                   # 0: the full vocabulary
    assert draft_ids(10).tolist() == list(range(29, 19, -1))      # the most frequent first
    with pytest.raises(ValueError, match="carry only 30"):
        draft_ids(31)
    assert draft_ids(None, "heads_plain.safetensors") is None
    with pytest.raises(ValueError, match="no token frequencies"):
        draft_ids(5, "heads_plain.safetensors")


def test_fine_tuned_without_its_original_is_labelled(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ft", mask_tokens=1, train_args={"init_from": str(tmp_path / "gone"), "k_max": 4})
    m, _, options = load.load_for(tmp_path / "ft", adapter=load.SHIPPED)
    assert options["k_max"] == 4
    assert quality.nll_judge(tmp_path / "ft", m, "cpu", torch.float32) is None
    assert "warning:" in capsys.readouterr().err
    res = bench.main(["--init_from", str(tmp_path / "ft"), "--methods", "ar,static@2", "--num_prompts", "1",
                      "--max_new_tokens", "3", "--warmup", "0", "--json"])
    out = capsys.readouterr().out
    assert "nll_self" in out.splitlines()[0] and "NOT the original" in out
    assert "nll" not in res["methods"]["ar"] and res["methods"]["ar"]["nll_self"] is not None
    tiny_checkpoint(tmp_path / "orig")       # with its original present, that one judges
    tiny_checkpoint(tmp_path / "ft2", mask_tokens=1, train_args={"init_from": str(tmp_path / "orig")})
    m, _, _ = load.load_for(tmp_path / "ft2", adapter=load.SHIPPED)
    original = quality.nll_judge(tmp_path / "ft2", m, "cpu", torch.float32)
    assert original is not None and original is not m and original.cfg.mask_token_ids == []


# ----------------------------------------------------------------------------------------------------------------
# the prompts file

@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a"}\n{"prompt": \n', "p.jsonl:2: not valid JSON"),
    ("", "p.jsonl: holds no prompts"),
    ('\n{"question": "a"}\n', "p.jsonl:2: missing field 'prompt'"),
    ('{"prompt": 3}\n', "p.jsonl:1: field 'prompt' is not a non-empty string"),
    ('["prompt"]\n', 'p.jsonl:1: expected a JSON object'),
])
def test_prompts_file_errors(tmp_path, capsys, text, message):
    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--prompts", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_prompts_of_another_tokenizer_refused(tmp_path, capsys):
    (tmp_path / "test_prompts.jsonl").write_text('{"prompt": "What is 2+2?", "answer": "4"}\n')
    other = {**fingerprint(CharTokenizer()), "probe_sha256": "0" * 16, "name": "smollm2"}
    (tmp_path / "meta.json").write_text(json.dumps({"format": FORMAT, "tokenizer": other}))
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--prompts", str(tmp_path / "test_prompts.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "tokenized with 'smollm2'" in err and err.count("\n") == 1, err


def test_prompts_builtin_selects_the_built_in_questions(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "m")
    monkeypatch.setattr(bench, "QUESTIONS", ["Say hi.", "Say bye."])
    res = bench.main(["--init_from", str(tmp_path / "m"), "--prompts", "builtin", "--methods", "ar",
                      "--num_prompts", "8", "--max_new_tokens", "2", "--warmup", "0"])
    assert res["num_prompts"] == 2
