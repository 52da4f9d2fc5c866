"""
Self-generated chat data (Magpie, Xu et al. 2024): the bundled instruct model writes the user questions itself, then
answers them. This is the data for distilling MTP heads or mask-token MTP into that same model: its own greedy answers
are exactly what a lossless draft must predict (heads trained on sampled answers, T=0.8, accepted 34% at depth 1
against 55% for greedy ones, in half the steps).

What is here: `generate_chunk` (one deterministic unit of work), `merge_chunks` (cross-chunk dedup and answer
filters), `split_conversations` (held-out splits that share no conversation with train), `describe` (statistics).
What is not: loading the model, the work folder and its resumption, writing token files (data/prepare.py), the task
and topic lists (data/topics.py), the decoding loop itself (decode.generate).

A chunk holds `chunk_size` conversations of four kinds, decoded in batches sorted by prompt length:
1. first turns: the chat template up to the user's turn, then either nothing (plain Magpie: the model writes the whole
   question) or a seeded opening such as "How do I bake sourdough bread?" (a task type x topic from
   data/topics.py; the varied sampler may add "I'm a farmer. " before and " Use a table." after)
   that the model continues. Questions are sampled (temperature, top-p) and kept when they end with
   a stop token, are long enough, hold no special token and are new (case and spacing ignored);
   failed slots are sampled again.
2. passage requests: "Summarise this: <passage>", the passage cut from one of this chunk's answers, so the model reads
   its own text in the prompt as well.
3. follow-ups: a finished first turn, then a second user turn the model writes (from an opening like
   "Why", or with the varied sampler one that quotes a phrase of the answer).
4. phrase questions: new first turns on a phrase of one of this chunk's answers ("Tell me more about
   <phrase>."): topics no list of data/topics.py holds, so the set grows where the lists run out.
Every question is answered greedily by default; answers cut at max_answer_tokens are kept by default: every token is
still the model's own choice, and dropping them would bias the data towards short answers.
A chunk depends only on its number and the settings, never on other chunks, so a set can be made in any number of
calls or processes and still come out identical.
"""

import random
import re
from collections import Counter
from dataclasses import dataclass

import torch

from data.topics import (FOLLOWUPS, FORM_FOLLOWUPS, PASSAGE_TASKS, PHRASE_FOLLOWUPS,
                         PHRASE_QUESTIONS, SAMPLERS, dress)
from decode import generate as decode_generate

SENTINEL = "\u2063QUESTION\u2063"   # stands for the user's text, to cut the template right where it would begin


@dataclass
class Settings:
    """Everything that decides a chunk's contents; prepare.py refuses to mix chunks made with different settings."""
    seed: int = 0
    sampler: str = "varied"          # openings of data/topics.SAMPLERS ("tasks": the 60k-slot set)
    chunk_size: int = 2048           # conversations per chunk: the unit of determinism, resumption and sharding
    batch_size: int = 512            # sequences per generate call
    magpie_share: float = 0.2        # first turns left entirely to the model; the rest start from a seeded opening
    passage_share: float = 0.1       # conversations asking about a passage of an earlier answer
    followup_share: float = 0.1      # two-turn conversations
    phrase_share: float = 0.1        # first turns about a phrase of another answer of the chunk
    question_temperature: float = 1.0
    question_top_p: float = 0.95
    question_rounds: int = 3         # attempts per question slot
    max_question_tokens: int = 96
    min_question_chars: int = 10
    max_passage_tokens: int = 160
    answer_temperature: float = 0.0  # 0: greedy
    max_answer_tokens: int = 512
    system: str | None = None        # system prompt (None: the template's own)


# settings that came after the 60k-slot set of 2026-11, with the values its chunks were made with:
# prepare.py reads a chunk folder's config.json that lacks them as having these
SETTINGS_ADDED = {"sampler": "tasks", "phrase_share": 0.0}


def normalise(text):
    return " ".join(text.lower().split())


def conversation_key(messages):
    """What makes two conversations duplicates: their user turns, case and spacing ignored."""
    return "\n".join(normalise(m["content"]) for m in messages if m["role"] == "user")


def finished(ids, stop_ids):
    return bool(ids) and ids[-1] in stop_ids


def batched(generate, model, prompts, max_new_tokens, batch_size, **kw):
    """generate() over batches of similar length (less padding); results in the order of `prompts`."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    outs = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        for i, ids in zip(rows, generate(model, [prompts[i] for i in rows], max_new_tokens, **kw)):
            outs[i] = list(ids)
    return outs


def user_turn_prefix(tok, history, system):
    """The chat template after `history` up to where the next user message begins: '...<|im_start|>user\\n'."""
    full = tok.chat_prompt([*history, {"role": "user", "content": SENTINEL}], system=system)
    return full[:full.index(SENTINEL)]


def write_questions(model, tok, contexts, s, generator, counts, seen, generate):
    """contexts: (history, opening) per slot -> the user's question per slot, or None where every round failed.
    The model continues each opening; `seen` holds the conversation keys already taken (updated here)."""
    stop_ids, specials = list(tok.stop_ids), set(tok.special.values())
    prompts = [tok.encode(user_turn_prefix(tok, history, s.system) + opening, specials=True)   # template text
               for history, opening in contexts]
    questions = [None] * len(contexts)
    pending = list(range(len(contexts)))
    for _ in range(s.question_rounds):
        outs = batched(generate, model, [prompts[i] for i in pending], s.max_question_tokens, s.batch_size,
                       temperature=s.question_temperature, top_p=s.question_top_p, stop_ids=stop_ids,
                       generator=generator)
        still = []
        for i, ids in zip(pending, outs):
            history, opening = contexts[i]
            text = (opening + tok.decode(ids[:-1] if finished(ids, stop_ids) else ids)).strip()
            key = conversation_key([*history, {"role": "user", "content": text}])
            if not finished(ids, stop_ids):
                counts["question_truncated"] += 1
            elif specials & set(ids[:-1]):
                counts["question_special"] += 1
            elif len(text) < s.min_question_chars:
                counts["question_short"] += 1
            elif key in seen:
                counts["question_duplicate"] += 1
            else:
                seen.add(key)
                questions[i] = text
                continue
            still.append(i)
        pending = still
        if not pending:
            break
    if pending:
        counts["question_given_up"] += len(pending)
    return questions


def answer(model, tok, records, s, generator, generate):
    """Fill each record's "answer": the model's reply to its messages (token ids, ending with the stop token when
    the reply ended before max_answer_tokens)."""
    prompts = [tok.encode(tok.chat_prompt(r["messages"], system=s.system), specials=True) for r in records]
    outs = batched(generate, model, prompts, s.max_answer_tokens, s.batch_size, temperature=s.answer_temperature,
                   stop_ids=list(tok.stop_ids), generator=generator)
    for r, ids in zip(records, outs):
        r["answer"] = ids


def answer_text(tok, ids):
    return tok.decode([t for t in ids if t not in tok.stop_ids])


def cut_passage(text, tok, max_tokens, rng):
    """Whole paragraphs of `text` from a random one on, within max_tokens; the leading sentences of that paragraph
    when it alone is too long; '' when not even its first sentence fits."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        return ""
    start = rng.randrange(len(paragraphs))
    passage = ""
    for sep, pieces in (("\n\n", paragraphs[start:]), (" ", re.split(r"(?<=[.!?])\s+", paragraphs[start]))):
        for piece in pieces:
            longer = passage + sep + piece if passage else piece
            if len(tok.encode(longer)) > max_tokens:
                break
            passage = longer
        if passage:
            return passage
    return ""


def answer_phrase(text, rng):
    """A few words of `text` to ask about: one of its **bold** terms or list-item headings
    ("2. Term:"), which is how the model marks its key ideas, else a name of two to four capitalised
    words inside a sentence ("the Silk Road"); '' when there is none. Any other run of words makes
    questions such as "Tell me more about need to identify." (measured)."""
    marked = re.findall(r"\*\*([^*\n]{3,40})\*\*", text)
    marked += re.findall(r"^\s*(?:\d+\.|[-*])\s+([^:*\n]{3,40}):", text, flags=re.M)
    marked = [m.strip(" :.") for m in marked]
    marked = [m for m in marked if m and len(m.split()) <= 5]
    names = re.findall(r"(?<=[a-z,] )([A-Z][a-z]+(?: [A-Z][a-z]+){1,3})", text)
    return rng.choice(marked or names) if marked or names else ""


def generate_chunk(model, tok, chunk, s, generate=decode_generate):
    """The conversations of chunk number `chunk` -> {"records": [...], "counts": {...}}. A record:
    kind (magpie, seeded, passage, followup, phrase), task, topic, messages (the conversation up to
    the last user turn), answer (token ids), group (the index of the first turn it grew from:
    held-out splits take whole groups)."""
    rng = random.Random(f"{s.seed}/{chunk}")
    # questions and answers draw from separate streams: sampled answers (answer_temperature > 0) leave the questions
    # as they are with greedy ones, so the two sets compare like for like
    asking = torch.Generator(model.embed.weight.device).manual_seed(rng.getrandbits(63))
    answering = torch.Generator(model.embed.weight.device).manual_seed(rng.getrandbits(63))
    counts, seen = Counter(), set()
    n_passage = round(s.chunk_size * s.passage_share)
    n_followup = round(s.chunk_size * s.followup_share)
    n_phrase = round(s.chunk_size * s.phrase_share)

    # 1. first turns, from nothing or from a seeded opening
    seeds = []
    for _ in range(s.chunk_size - n_passage - n_followup - n_phrase):
        magpie = rng.random() < s.magpie_share
        seeds.append(("magpie", None, None, "") if magpie else
                     ("seeded", *SAMPLERS[s.sampler](rng)))
    questions = write_questions(model, tok, [([], opening) for *_, opening in seeds], s, asking, counts, seen,
                                generate)
    first = [dict(kind=kind, task=task, topic=topic, messages=[{"role": "user", "content": q}])
             for (kind, task, topic, _), q in zip(seeds, questions) if q is not None]
    for g, r in enumerate(first):
        r["group"] = g
    answer(model, tok, first, s, answering, generate)

    # 2. requests about a passage of an earlier answer
    passages = []
    for src in rng.sample(first, min(n_passage, len(first))):
        text = answer_text(tok, src["answer"])
        if not finished(src["answer"], tok.stop_ids):
            text = text[:max(text.rfind(c) for c in ".!?\n") + 1]   # drop the sentence the answer was cut in
        passage = cut_passage(text, tok, s.max_passage_tokens, rng)
        task = rng.choice(sorted(PASSAGE_TASKS))
        messages = [{"role": "user", "content": PASSAGE_TASKS[task].format(passage=passage)}]
        if not passage or conversation_key(messages) in seen:
            counts["passage_unusable"] += 1
            continue
        seen.add(conversation_key(messages))
        passages.append(dict(kind="passage", task=task, topic=src["topic"], messages=messages, group=src["group"]))

    # 3. second turns after a finished first answer
    done = [r for r in first if finished(r["answer"], tok.stop_ids)]
    sources = rng.sample(done, min(n_followup, len(done)))
    histories = [[*r["messages"], {"role": "assistant", "content": answer_text(tok, r["answer"])}] for r in sources]
    asks = [("followup", r, h, followup_opening(h[-1]["content"], s.sampler, rng))
            for r, h in zip(sources, histories)]

    # 4. new first turns about a phrase of an answer: topics no list holds, in the model's words;
    # answers in random order until n_phrase have a phrase (no draw at all without phrase slots, so
    # the chunks of the 60k-slot set come out as they were)
    n_asked = 0
    for src in rng.sample(first, len(first)) if n_phrase else []:
        phrase = answer_phrase(answer_text(tok, src["answer"]), rng)
        if phrase:
            opening = dress(rng, rng.choice(PHRASE_QUESTIONS).format(phrase=phrase))
            asks.append(("phrase", {**src, "task": "phrase", "topic": phrase}, [], opening))
            n_asked += 1
            if n_asked == n_phrase:
                break
    if n_asked < n_phrase:
        counts["phrase_unusable"] += n_phrase - n_asked
    questions = write_questions(model, tok, [(h, o) for *_, h, o in asks], s, asking, counts, seen,
                                generate)
    derived = [dict(kind=kind, task=src["task"], topic=src["topic"],
                    messages=[*h, {"role": "user", "content": q}], group=src["group"])
               for (kind, src, h, _), q in zip(asks, questions) if q is not None]
    answer(model, tok, passages + derived, s, answering, generate)   # one call: fuller batches
    return {"records": first + passages + derived, "counts": dict(sorted(counts.items()))}


def followup_opening(answer, sampler, rng):
    """The start of a second user turn: FOLLOWUPS for the tasks sampler; the varied one also asks
    about a phrase of the answer just given, or for that answer in another form."""
    if sampler == "tasks":
        return rng.choice(FOLLOWUPS)
    pool = rng.choice(["plain", "phrase", "form"])
    phrase = answer_phrase(answer, rng) if pool == "phrase" else ""
    if phrase:
        return rng.choice(PHRASE_FOLLOWUPS).format(phrase=phrase)
    return rng.choice(FORM_FOLLOWUPS if pool == "form" else FOLLOWUPS)


def merge_chunks(chunks, tok, min_answer_tokens=2, keep_truncated=True):
    """Chunk dicts in chunk order -> (records, counts): duplicates across chunks dropped (the first kept), then
    answers filtered. Each record gains "truncated"; its group becomes (chunk number, group)."""
    counts, seen, records = Counter(), set(), []
    specials = set(tok.special.values())
    for c, chunk in enumerate(chunks):
        counts.update(chunk["counts"])
        for r in chunk["records"]:
            key = conversation_key(r["messages"])
            body = r["answer"][:-1] if finished(r["answer"], tok.stop_ids) else r["answer"]
            if key in seen:
                counts["question_duplicate_across_chunks"] += 1
                continue
            seen.add(key)
            truncated = not finished(r["answer"], tok.stop_ids)
            if truncated and not keep_truncated:
                counts["answer_truncated"] += 1
            elif specials & set(body):
                counts["answer_special"] += 1
            elif len(body) < min_answer_tokens:
                counts["answer_short"] += 1
            else:
                counts["kept_truncated_answers"] += truncated
                records.append({**r, "group": (c, r["group"]), "truncated": truncated})
    counts["distinct_questions"] = len(seen)
    return records, dict(sorted(counts.items()))


def split_conversations(records, n_val, n_test, seed):
    """{"val", "test", "train"}: held-out splits of exactly n_val and n_test records made of whole groups, so no
    held-out conversation shares a first turn (or the passage source) with a training one."""
    groups = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    splits = {"val": [], "test": [], "train": []}
    for g in order:
        for name, size in (("val", n_val), ("test", n_test), ("train", None)):
            if size is None or len(splits[name]) + len(groups[g]) <= size:
                splits[name] += groups[g]
                break
    for name, size in (("val", n_val), ("test", n_test)):
        if len(splits[name]) < size:
            raise ValueError(f"--n_{name} {size}: only {len(splits[name])} held-out conversations could be formed "
                             f"from {len(records)}")
    return splits


def length_histogram(lengths, cap):
    """Counts in bins [1, 32), [32, 64), ... doubling up to the cap, and the cap itself (answers cut there)."""
    edges, edge = [1], 32
    while edge < cap:
        edges.append(edge)
        edge *= 2
    edges.append(cap)
    hist = {f"{lo}-{hi - 1}": sum(lo <= n < hi for n in lengths) for lo, hi in zip(edges, edges[1:])}
    hist[f"{cap} (cap)"] = sum(n >= cap for n in lengths)
    return hist


def distinct_2(texts):
    """Distinct word bigrams / all word bigrams over the texts (Li et al. 2016): lower means more repetitive."""
    bigrams = [tuple(w[i:i + 2]) for w in (normalise(t).split() for t in texts) for i in range(len(w) - 1)]
    return round(len(set(bigrams)) / max(1, len(bigrams)), 4)


def describe(records, counts, max_answer_tokens):
    """The statistics printed at the end and stored in meta.json."""
    lengths = [len(r["answer"]) - (not r["truncated"]) for r in records]   # without the stop token
    distinct = counts["distinct_questions"]
    before = distinct + counts.get("question_duplicate", 0) + counts.get("question_duplicate_across_chunks", 0)
    questions = [r["messages"][-1]["content"] for r in records]
    return {
        "conversations": len(records),
        "answer_tokens": sum(lengths),
        "answer_length_mean": round(sum(lengths) / max(1, len(lengths)), 1),
        "answer_length_histogram": length_histogram(lengths, max_answer_tokens),
        "truncated_share": round(sum(r["truncated"] for r in records) / max(1, len(records)), 4),
        "questions_before_dedup": before,
        "distinct_ratio_before_dedup": round(distinct / max(1, before), 4),
        "distinct_ratio_after_dedup": round(len({conversation_key(r["messages"]) for r in records})
                                            / max(1, len(records)), 4),
        "question_distinct_2": distinct_2(questions),
        "kinds": dict(sorted(Counter(r["kind"] for r in records).items())),
        "tasks": dict(sorted(Counter(r["task"] or "magpie" for r in records).items())),
    }
