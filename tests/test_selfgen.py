"""Tests of self-generated chat data (data/selfgen.py, data/topics.py, `prepare.py selfgen`) and of the hand-written
evaluation prompts (data/chat_prompts.jsonl). CPU only: a tiny random model or a scripted stand-in for generate."""

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from data import prepare, selfgen, topics
from data.dataset import load_meta
from data.selfgen import Settings, describe, finished, generate_chunk, merge_chunks, split_conversations
from decode import generate
from helpers import ChatChars, default_init
from prompts import read_prompts

DATA = Path(__file__).resolve().parent.parent / "data"


def tiny_model(vocab_size):
    model = default_init(vocab_size, max_seq_len=512).eval()
    with torch.no_grad():   # small tied embeddings: near-uniform next-token distributions, so stop tokens do come up
        model.embed.weight.mul_(0.1)
    return model


TINY = dict(chunk_size=10, batch_size=4, question_rounds=10, max_question_tokens=12, min_question_chars=1,
            max_answer_tokens=10, max_passage_tokens=40, magpie_share=0.5, passage_share=0.2, followup_share=0.2)


def scripted_generate(continuations=None, answer_end="\n\nSecond part here.<|im_end|>"):
    """A stand-in for decode.generate: question prompts (those not ending in the assistant's turn) get the next of
    `continuations` (default: ' #k?' with k counting up, always new), answer prompts get 'Reply k.' + answer_end.
    Records every prompt it was given."""
    calls, counter = [], iter(range(10 ** 6))

    def fake(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(), generator=None):
        tok = ChatChars()
        outs = []
        for p in prompts:
            text = tok.decode(p)
            calls.append(text)
            if text.endswith("<|im_start|>assistant\n"):
                outs.append(tok.encode(f"Reply {next(counter)}.{answer_end}", specials=True)[:max_new_tokens])
            else:
                cont = continuations.pop(0) if continuations else f" #{next(counter)}?<|im_end|>"
                outs.append(tok.encode(cont, specials=True)[:max_new_tokens])
        return outs
    fake.calls = calls
    return fake


# ----------------------------------------------------------------------------------------------------------------
# the held-out evaluation prompts and the seeding

def word_ngrams(text, n):
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def held_out_prompts(name):
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines]


def test_chat_prompts_parse_and_are_not_in_the_seeds():
    prompts = held_out_prompts("chat_prompts.jsonl")
    assert len(prompts) >= 72 and len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert max(map(len, prompts)) > 300 and min(map(len, prompts)) < 30   # from a few words to a passage
    # the evaluation set stays out of training: no six-word run of it appears in the seeding lists
    seeds = word_ngrams((DATA / "topics.py").read_text(encoding="utf-8"), 6)
    for p in prompts:
        assert not (word_ngrams(p, 6) & seeds), p


def test_varied_openings_share_no_topic_wording_with_held_out_prompts():
    # a run of six words an opening shares with a held-out prompt is allowed only when it is all
    # request words (templates, answer forms, articles), as "write a short story about a" is; the
    # tasks sampler, kept for the 60k-slot set's chunks, fails this (topics.NEAR_HELD_OUT)
    templates = [t for ts, _ in topics.VARIED_TASKS.values() for t in ts]
    request_text = " ".join(templates + topics.FORMATS)
    request_words = {"a", "an", "the"} | {w for (w,) in word_ngrams(request_text, 1)}
    rng = random.Random(0)
    openings = [topics.seed_question_varied(rng)[2] for _ in range(60000)]
    grams = set().union(*(word_ngrams(o, 6) for o in openings))
    for p in held_out_prompts("chat_prompts.jsonl") + held_out_prompts("chat_prompts_val.jsonl"):
        assert all(set(g) <= request_words for g in word_ngrams(p, 6) & grams), p


@pytest.mark.parametrize("sampler, files", [
    ("tasks", ["chat_prompts.jsonl"]),   # it does write two of the validation prompts
    ("varied", ["chat_prompts.jsonl", "chat_prompts_val.jsonl"])])
def test_seed_questions_never_copy_an_evaluation_prompt(sampler, files):
    from bench import QUESTIONS
    held_out = {selfgen.normalise(p) for f in files for p in held_out_prompts(f)}
    held_out |= {selfgen.normalise(p) for p in QUESTIONS}
    rng = random.Random(0)
    openings = {selfgen.normalise(topics.SAMPLERS[sampler](rng)[2]) for _ in range(20000)}
    assert not (openings & held_out)


@pytest.mark.parametrize("sampler, tasks", [("tasks", topics.TASKS),
                                            ("varied", topics.VARIED_TASKS)])
def test_seed_question_covers_every_task_and_embeds_its_topic(sampler, tasks):
    rng = random.Random(0)
    seen = {}
    for _ in range(6000):
        task, topic, opening = topics.SAMPLERS[sampler](rng)
        seen.setdefault(task, []).append((topic, opening))
    assert set(seen) == set(tasks)
    for task, pairs in seen.items():
        assert len({o for _, o in pairs}) > 1, task
        if task not in ("conversion", "comparison", "list"):   # these spread their topic over several slots
            assert all(t in o for t, o in pairs), task


def test_tasks_sampler_still_draws_the_openings_of_the_60k_set():
    # the shared 60k-slot set's chunks (made before the varied sampler) merge only while it does
    rng = random.Random(0)
    assert [topics.seed_question(rng)[2] for _ in range(4)] == [
        "Can you recommend a gift for a ten-year-old?",
        "I need a list of skills every adult should have.",
        "Solve this word problem: Marco starts with 38 balloons. He finds 40 more balloons. "
        "How many balloons does Marco have in the end?",
        "What is 10 square metres in square feet?"]


def test_varied_sampler_asks_as_someone_in_a_form_and_repeats_less():
    rng = {name: random.Random(0) for name in topics.SAMPLERS}
    draws = {name: [sampler(rng[name])[2] for _ in range(10000)]
             for name, sampler in topics.SAMPLERS.items()}
    varied = draws["varied"]
    personas = {o for o in varied if any(p in o for p in topics.PERSONAS)}
    forms = {o for o in varied if o.endswith(tuple(" " + f for f in topics.FORMATS))}
    assert 0.4 < len(personas) / len(varied) < 0.6 and 0.3 < len(forms) / len(varied) < 0.5
    assert len(personas & forms) > 1000   # persona and form are drawn independently
    assert len(set(varied)) > 3 * len(set(draws["tasks"]))


def test_answer_phrase_takes_a_marked_term_or_a_name():
    rng = random.Random(0)
    text = ("1. **Budget:** Write it down.\n2. **Saving money early**: it adds up. **a*b\n"
            "- Water supply: check it.\n3. A heading much too long to be a term: no.")
    assert {selfgen.answer_phrase(text, rng) for _ in range(50)} == {
        "Budget", "Saving money early", "Water supply"}
    text = "Trade on the Silk Road grew, and Marco Polo went. The Roman Empire fell. New Ideas came"
    assert {selfgen.answer_phrase(text, rng) for _ in range(50)} == {
        "Silk Road", "Marco Polo", "Roman Empire"}   # not "New Ideas", a sentence's first words
    assert selfgen.answer_phrase("It is on the way to a car in Rome.", rng) == ""


# ----------------------------------------------------------------------------------------------------------------
# one chunk

def test_generate_chunk_deterministic_greedy_answers():
    tok = ChatChars()
    model = tiny_model(tok.vocab_size)
    s = Settings(seed=3, **TINY)
    with torch.no_grad():
        a = generate_chunk(model, tok, 0, s)
        b = generate_chunk(model, tok, 0, s)
        c = generate_chunk(model, tok, 1, s)
    assert a == b and a["records"] != c["records"]
    assert {"magpie", "seeded"} <= {r["kind"] for r in a["records"]}
    with torch.no_grad():   # sampled answers leave the first-turn questions as they were
        sampled = generate_chunk(model, tok, 0, Settings(seed=3, answer_temperature=1.0, **TINY))
    firsts = [[r["messages"] for r in x["records"] if r["kind"] in ("magpie", "seeded")] for x in (a, sampled)]
    assert firsts[0] == firsts[1] and [r["answer"] for r in a["records"]] != [r["answer"] for r in sampled["records"]]
    for r in a["records"][:3]:   # answers are the model's own greedy continuations
        with torch.no_grad():
            prompt = tok.encode(tok.chat_prompt(r["messages"]), specials=True)
            assert generate(model, [prompt], 10, stop_ids=tok.stop_ids)[0] == r["answer"]


def test_generate_chunk_seeding_kinds_and_filters():
    tok = ChatChars()
    model = tiny_model(tok.vocab_size)
    # first-turn slots 0-5 get these continuations in round 1: a duplicate of slot 0 only if the openings match
    # (magpie_share=1: empty openings), one with a special token, one truncated, one too short
    conts = [" Hello there?<|im_end|>", " hello   THERE?<|im_end|>", " a<|im_start|>b<|im_end|>",
             " " + "x" * 30, "<|im_end|>", " Fine question?<|im_end|>"]
    fake = scripted_generate(continuations=conts)
    s = Settings(seed=0, chunk_size=10, batch_size=3, magpie_share=1.0, passage_share=0.2, followup_share=0.2,
                 phrase_share=0.0, sampler="tasks", min_question_chars=3, max_question_tokens=20,
                 max_passage_tokens=20)
    chunk = generate_chunk(model, tok, 0, s, generate=fake)
    counts, records = chunk["counts"], chunk["records"]
    assert counts == dict(question_duplicate=1, question_short=1, question_special=1, question_truncated=1)
    kinds = [r["kind"] for r in records]
    assert kinds == ["magpie"] * 6 + ["passage"] * 2 + ["followup"] * 2   # 10 slots: 6 first, 2 + 2 derived
    first = records[:6]
    assert len({r["messages"][0]["content"].lower() for r in first}) == 6          # failed slots were resampled
    for r in records[6:8]:   # a paragraph of the model's earlier answer, as many as fit the token limit (20)
        paragraphs = selfgen.answer_text(tok, first[r["group"]]["answer"]).split("\n\n")
        assert r["messages"][0]["content"] in [topics.PASSAGE_TASKS[r["task"]].format(passage=p) for p in paragraphs]
    for r in records[8:]:    # a follow-up carries its first turn and the model's answer
        user, assistant, follow = r["messages"]
        assert user == first[r["group"]]["messages"][0] and assistant["content"] == selfgen.answer_text(
            tok, first[r["group"]]["answer"])
        assert follow["role"] == "user" and follow["content"].startswith(tuple(o for o in topics.FOLLOWUPS))

    # seeded openings reach the prompts the model continues, and the question keeps them
    fake = scripted_generate()
    s = Settings(seed=1, chunk_size=40, batch_size=8, magpie_share=0.0, passage_share=0.0,
                 followup_share=0.0, phrase_share=0.0)
    records = generate_chunk(model, tok, 0, s, generate=fake)["records"]
    assert {r["kind"] for r in records} == {"seeded"} and len({r["task"] for r in records}) > 5
    for r in records:
        question = r["messages"][0]["content"]
        opening = re.sub(r" #\d+\?$", "", question)
        assert any(c.endswith("<|im_start|>user\n" + opening) for c in fake.calls)
        if r["task"] in ("explanation", "how-to", "story", "email", "advice", "definition", "planning"):
            assert r["topic"] in question


def test_generate_chunk_asks_about_phrases_of_its_answers():
    tok = ChatChars()
    fake = scripted_generate(answer_end=" The **Key idea** here.<|im_end|>")
    s = Settings(seed=0, chunk_size=40, batch_size=8, magpie_share=0.0, passage_share=0.0,
                 followup_share=0.3, phrase_share=0.2, min_question_chars=1)   # "" + " #1?" will do
    records = generate_chunk(tiny_model(tok.vocab_size), tok, 0, s, generate=fake)["records"]
    first = [r for r in records if r["kind"] == "seeded"]
    phrases = [r for r in records if r["kind"] == "phrase"]
    assert len(first) == 20 and len(phrases) == 8
    for r in phrases:   # a new first turn on a phrase of an answer, held out with its group
        (user,) = r["messages"]
        assert r["task"] == "phrase" and r["topic"] == "Key idea" and r["group"] < len(first)
        assert any(q.format(phrase="Key idea") in user["content"] for q in topics.PHRASE_QUESTIONS)
    openings = [r["messages"][2]["content"] for r in records if r["kind"] == "followup"]
    quoting = tuple(f.format(phrase="Key idea") for f in topics.PHRASE_FOLLOWUPS)
    forms = tuple(topics.FORM_FOLLOWUPS)
    assert len(openings) == 12
    assert all(o.startswith(tuple(topics.FOLLOWUPS) + forms + quoting) for o in openings)
    assert any(o.startswith(quoting) for o in openings)
    assert any(o.startswith(forms) for o in openings)


# ----------------------------------------------------------------------------------------------------------------
# merging, splitting, statistics

def record(question, answer, group=0, kind="magpie"):
    return dict(kind=kind, task=None, topic=None, messages=[{"role": "user", "content": question}], answer=answer,
                group=group)


def test_cut_passage_takes_whole_paragraphs_or_leading_sentences():
    tok = ChatChars()
    text = "Alpha one.\n\nBeta two. Beta three is long.\n\nGamma."
    rng = random.Random(0)
    cuts = {selfgen.cut_passage(text, tok, 24, rng) for _ in range(50)}
    assert cuts == {"Alpha one.", "Beta two.", "Gamma."}
    assert {selfgen.cut_passage(text, tok, 100, rng) for _ in range(50)} == {
        text, "Beta two. Beta three is long.\n\nGamma.", "Gamma."}
    assert selfgen.cut_passage(text, tok, 3, rng) == ""


def test_passages_of_cut_answers_end_with_a_whole_sentence():
    tok = ChatChars()
    s = Settings(chunk_size=10, batch_size=4, magpie_share=0.0, passage_share=0.5, followup_share=0.0,
                 phrase_share=0.0, max_answer_tokens=30, max_passage_tokens=60)
    fake = scripted_generate(answer_end=" Then more words without any end at all")   # cut at 30 tokens
    records = generate_chunk(tiny_model(tok.vocab_size), tok, 0, s, generate=fake)["records"]
    passages = [r for r in records if r["kind"] == "passage"]
    assert len(passages) == 5 and not any(finished(r["answer"], tok.stop_ids) for r in records)
    for r in passages:
        source = selfgen.answer_text(tok, records[r["group"]]["answer"])
        assert source.startswith("Reply ") and " Then more" in source
        passage = source.split(" Then")[0]
        assert r["messages"][0]["content"] == topics.PASSAGE_TASKS[r["task"]].format(passage=passage)


def test_merge_dedups_across_chunks_and_filters_answers():
    tok = ChatChars()
    end, start = tok.special["<|im_end|>"], tok.special["<|im_start|>"]
    a, b = tok.encode("abc"), tok.encode("abcd")
    chunks = [{"counts": {"question_duplicate": 2}, "records": [
                  record("What is up?", a + [end], 0), record("Cut off here", b, 1), record("Tiny", [5, end], 2)]},
              {"counts": {}, "records": [
                  record("what  is UP?", b + [end], 0), record("Special", [5, start, 6, end], 1),
                  record("Fine", b + [end], 2)]}]
    records, counts = merge_chunks(chunks, tok, min_answer_tokens=2, keep_truncated=True)
    assert [r["messages"][0]["content"] for r in records] == ["What is up?", "Cut off here", "Fine"]
    assert [r["truncated"] for r in records] == [False, True, False]
    assert [r["group"] for r in records] == [(0, 0), (0, 1), (1, 2)]
    assert counts == dict(question_duplicate=2, question_duplicate_across_chunks=1, answer_short=1,
                          answer_special=1, kept_truncated_answers=1, distinct_questions=5)
    records, counts = merge_chunks(chunks, tok, keep_truncated=False)
    assert len(records) == 2 and counts["answer_truncated"] == 1

    stats = describe(records, counts, max_answer_tokens=4)
    assert stats["conversations"] == 2 and stats["answer_tokens"] == 3 + 4
    assert stats["questions_before_dedup"] == 5 + 2 + 1 and stats["distinct_ratio_before_dedup"] == 5 / 8


def test_describe_statistics_are_consistent():
    rng = random.Random(0)
    recs, cap = [], 512
    for i in range(300):
        n = rng.choice([3, 40, 100, 300, cap])
        truncated = n == cap
        answer = list(range(n)) + ([] if truncated else [2])
        recs.append({**record(f"question number {i % 250}", answer), "truncated": truncated})
    stats = describe(recs, {"distinct_questions": 300, "question_duplicate": 100}, cap)
    hist = stats["answer_length_histogram"]
    assert list(hist) == ["1-31", "32-63", "64-127", "128-255", "256-511", "512 (cap)"]
    assert sum(hist.values()) == 300 and hist["512 (cap)"] == sum(r["truncated"] for r in recs)
    assert stats["truncated_share"] == round(hist["512 (cap)"] / 300, 4)
    assert stats["answer_tokens"] == sum(len(r["answer"]) - (not r["truncated"]) for r in recs)
    assert stats["distinct_ratio_before_dedup"] == 0.75 and stats["distinct_ratio_after_dedup"] == round(250 / 300, 4)
    assert 0 < stats["question_distinct_2"] <= 1


def test_split_conversations_keeps_groups_whole():
    groups = [(i // 7, i % 3) if i < 40 else (i, 0) for i in range(70)]   # groups of 2-3, then single ones
    recs = [{**record(f"q{i}", [1, 2], group=g), "truncated": False} for i, g in enumerate(groups)]
    splits = split_conversations(recs, 5, 6, seed=0)
    assert len(splits["val"]) == 5 and len(splits["test"]) == 6 and len(splits["train"]) == 59
    where = {}
    for name, rs in splits.items():
        for r in rs:
            assert where.setdefault(r["group"], name) == name
    assert split_conversations(recs, 5, 6, seed=0) == splits != split_conversations(recs, 5, 6, seed=1)
    with pytest.raises(ValueError, match="--n_val 80"):
        split_conversations(recs, 80, 0, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# the command line: chunks, shards, resumption

def files_of(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            data = Path(root, n).read_bytes()
            if n == "meta.json":   # the timing differs from run to run; everything else must not
                meta = json.loads(data)
                assert meta.pop("timing")["chunks"] > 0
                data = json.dumps(meta).encode()
            out[os.path.relpath(os.path.join(root, n), folder)] = data
    return out


def run(*argv):
    prepare.main([str(a) for a in argv])


def use_tiny_model(monkeypatch):
    tok = ChatChars()
    model = tiny_model(tok.vocab_size)
    monkeypatch.setattr(prepare, "get_tokenizer",
                        lambda name, device="cpu", dtype=None, with_model=False: (tok, model) if with_model else tok)


def test_prepare_selfgen_shards_and_resumption_equal_one_run(tmp_path, monkeypatch):
    use_tiny_model(monkeypatch)
    args = ["selfgen", "--n", 14, "--n_val", 2, "--n_test", 2, "--chunk_size", 6, "--batch_size", 4, "--device",
            "cpu", "--max_question_tokens", 12, "--min_question_chars", 1, "--max_answer_tokens", 8,
            "--question_rounds", 10]   # the random model's questions fill the splits
    run(*args, "--out", tmp_path / "one")
    one = files_of(tmp_path / "one")
    meta = load_meta(tmp_path / "one")
    assert meta["task"] == "chat" and meta["stats"]["conversations"] == sum(
        s["examples"] for s in meta["splits"].values())
    assert meta["splits"]["val"]["examples"] == 2 and meta["splits"]["test"]["examples"] == 2
    assert sum(meta["stats"]["answer_length_histogram"].values()) == meta["stats"]["conversations"]
    (p, _) = read_prompts(tmp_path / "one" / "test_prompts.jsonl")
    assert p["prompt"].startswith("<|im_start|>system\n") and p["prompt"].endswith("<|im_start|>assistant\n")

    for shard in (1, 0):    # two processes sharing the chunks, then the call that writes the folder
        run(*args, "--out", tmp_path / "two", "--shard", shard, "--n_shards", 2)
        assert not os.path.exists(tmp_path / "two")
    run(*args, "--out", tmp_path / "two")
    assert files_of(tmp_path / "two") == one

    calls = 0   # --time_limit 0: one chunk per call, resumed by calling again
    while not os.path.exists(tmp_path / "three"):
        run(*args, "--out", tmp_path / "three", "--time_limit", 0)
        calls += 1
    assert calls == 3 and files_of(tmp_path / "three") == one

    (tmp_path / "three.chunks" / "chunk_00001.json").write_text('{"records": [')   # cut short by a copy
    with pytest.raises(ValueError, match="chunk_00001.json: not a chunk file"):
        run(*args, "--out", tmp_path / "three", "--overwrite")
    assert files_of(tmp_path / "three") == one    # bad input loses nothing
    with pytest.raises(ValueError, match=r"other settings \(seed\)"):
        run(*args, "--out", tmp_path / "three", "--overwrite", "--seed", 1)
    with pytest.raises(ValueError, match="--shard 2: must lie in 0..1"):
        run(*args, "--out", tmp_path / "four", "--shard", 2, "--n_shards", 2)


def test_prepare_selfgen_merges_chunks_made_before_the_sampler_setting(tmp_path, monkeypatch):
    use_tiny_model(monkeypatch)
    args = ["selfgen", "--n", 6, "--n_val", 1, "--n_test", 1, "--chunk_size", 4, "--batch_size", 4,
            "--device", "cpu", "--max_question_tokens", 12, "--min_question_chars", 1,
            "--max_answer_tokens", 8, "--out", tmp_path / "old"]
    old_sampler = ["--sampler", "tasks", "--phrase_share", 0]
    run(*args, *old_sampler)
    made = files_of(tmp_path / "old")
    config = tmp_path / "old.chunks" / "config.json"   # as written before these settings existed
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                  if k not in selfgen.SETTINGS_ADDED}))
    run(*args, *old_sampler, "--overwrite")
    assert files_of(tmp_path / "old") == made
    with pytest.raises(ValueError, match=r"other settings \(phrase_share, sampler\)"):
        run(*args, "--overwrite")
