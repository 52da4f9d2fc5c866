"""
How varied the self-generated questions are, for each question sampler of data/topics.py
(results in README.md).

    python results/selfgen_diversity/measure.py seeds          # openings only: CPU, seconds
    python results/selfgen_diversity/measure.py questions --sampler tasks --out q_tasks.json
    python results/selfgen_diversity/measure.py summary q_tasks.json q_varied.json
    python results/selfgen_diversity/measure.py chunk --sampler varied --out chunk.json

`seeds` draws openings as generate_chunk does (chunks of 2048 slots, magpie share 0.2; the tasks
sampler with the 60k-slot set's settings) and counts the distinct ones as the set grows.
`questions` runs the first-turn step of one chunk (selfgen.write_questions) with one round, so every
duplicate the model writes is counted, and no answers: the expensive part stays on the GPU. `chunk`
makes one small chunk with short answers, for the kinds that grow from answers (passages,
follow-ups, phrase questions).
"""

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data import selfgen, topics   # noqa: E402
from data.prepare import get_tokenizer   # noqa: E402

TASK_TABLES = {"tasks": topics.TASKS, "varied": topics.VARIED_TASKS}


def set_settings(sampler):
    """A set's settings: the tasks sampler's as in the 60k-slot set, the varied one's defaults."""
    return selfgen.Settings(**(selfgen.SETTINGS_ADDED if sampler == "tasks" else {}))


def first_turn_seeds(s, chunk):
    """The (kind, task, topic, opening) of chunk `chunk`'s first turns, drawn as generate_chunk
    draws them."""
    rng = random.Random(f"{s.seed}/{chunk}")
    rng.getrandbits(63), rng.getrandbits(63)   # the question and answer generators' seeds
    derived = (s.passage_share, s.followup_share, s.phrase_share)
    n_first = s.chunk_size - sum(round(s.chunk_size * share) for share in derived)
    sampler = topics.SAMPLERS[s.sampler]
    magpie = ("magpie", None, None, "")
    return [magpie if rng.random() < s.magpie_share else ("seeded", *sampler(rng))
            for _ in range(n_first)]


def reachable(name, draws=5000):
    """Templates x topics the sampler can reach, leaving out the word problems (a new one nearly
    every draw; topics counted over `draws` fills per task), then times the dressings of the varied
    sampler (none, or one of leads x personas; none, or a form)."""
    rng, pairs, dressed = random.Random(0), 0, 0
    for task, (templates, fill) in TASK_TABLES[name].items():
        if task == "math":
            continue
        n = len(templates) * len({fill(rng)["topic"] for _ in range(draws)})
        pairs += n
        personas = 1 + len(topics.PERSONA_LEADS) * len(topics.PERSONAS)
        forms = 1 if task in topics.FORMLESS else 1 + len(topics.FORMATS)
        dressed += n * (personas * forms if name == "varied" else 1)
    return pairs, dressed


def seeded_openings(s, n):
    """The first n seeded openings of a set (normalised), with their (task, topic) pairs."""
    openings, pairs, chunk = [], set(), 0
    while len(openings) < n:
        drawn = [x for x in first_turn_seeds(s, chunk) if x[0] == "seeded"]
        openings += [selfgen.normalise(o) for *_, o in drawn]
        pairs |= {(task, topic) for _, task, topic, _ in drawn if task != "math"}
        chunk += 1
    return openings[:n], pairs


def seeds(args):
    for name in sorted(topics.SAMPLERS):
        openings, pairs = seeded_openings(set_settings(name), max(args.sizes))
        for n in args.sizes:
            row = dict(sampler=name, openings=n, distinct=len(set(openings[:n])),
                       distinct_ratio=round(len(set(openings[:n])) / n, 4))
            if n == max(args.sizes):
                row["task_topic_pairs_seen"] = len(pairs)
                row["templates_x_topics"], row["with_personas_and_forms"] = reachable(name)
            print(json.dumps(row))


def questions(args):
    s = selfgen.Settings(sampler=args.sampler, chunk_size=args.n, batch_size=args.batch_size,
                         question_rounds=1, passage_share=0.0, followup_share=0.0, phrase_share=0.0)
    tok, model = get_tokenizer("smollm2", "cpu", torch.float32, with_model=True)
    rng = random.Random(f"{s.seed}/0")
    asking = torch.Generator().manual_seed(rng.getrandbits(63))   # as generate_chunk seeds it
    drawn = first_turn_seeds(s, 0)
    counts, seen, t = Counter(), set(), time.time()
    with torch.no_grad():
        qs = selfgen.write_questions(model, tok, [([], o) for *_, o in drawn], s, asking, counts,
                                     seen, selfgen.decode_generate)
    kept = [dict(kind=k, task=task, opening=o, question=q)
            for (k, task, _, o), q in zip(drawn, qs) if q]
    asked = len(kept) + counts["question_duplicate"]
    out = dict(sampler=args.sampler, slots=args.n, seconds=round(time.time() - t),
               counts=dict(counts), distinct_ratio=round(len(kept) / max(1, asked), 4),
               distinct_2=selfgen.distinct_2([r["question"] for r in kept]), questions=kept)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in out.items() if k != "questions"}))


def chunk(args):
    s = selfgen.Settings(sampler=args.sampler, chunk_size=args.n, batch_size=args.batch_size,
                         max_answer_tokens=args.max_answer_tokens)
    tok, model = get_tokenizer("smollm2", "cpu", torch.float32, with_model=True)
    t = time.time()
    with torch.no_grad():
        made = selfgen.generate_chunk(model, tok, 0, s)
    rows = [dict(kind=r["kind"], task=r["task"],
                 user=[m["content"] for m in r["messages"] if m["role"] == "user"])
            for r in made["records"]]
    out = dict(sampler=args.sampler, slots=args.n, max_answer_tokens=args.max_answer_tokens,
               seconds=round(time.time() - t), counts=made["counts"], kept=len(rows),
               kinds=dict(Counter(r["kind"] for r in rows)), conversations=rows)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in out.items() if k != "conversations"}))


def summary(args):
    """Per questions file: its ratios, and an estimate of the seeded questions' distinct ratio at
    the set sizes of `seeds`: a question the model ended right after its opening repeats as often
    as that opening does, one it continued is taken to be new (so an upper estimate)."""
    for path in args.files:
        run = json.loads(Path(path).read_text())
        seeded = [r for r in run["questions"] if r["kind"] == "seeded"]
        verbatim = sum(r["question"] == r["opening"].strip() for r in seeded) / max(1, len(seeded))
        row = dict(sampler=run["sampler"], slots=run["slots"], kept=len(run["questions"]),
                   duplicates=run["counts"].get("question_duplicate", 0),
                   distinct_ratio=run["distinct_ratio"], distinct_2=run["distinct_2"],
                   seeded_verbatim=round(verbatim, 3), seconds=run["seconds"])
        openings, _ = seeded_openings(set_settings(run["sampler"]), max(args.sizes))
        rng = random.Random(0)
        ended = [rng.random() < verbatim for _ in openings]
        for n in args.sizes:
            repeats = [o for o, e in zip(openings[:n], ended) if e]
            row[f"estimate_{n}"] = round((n - len(repeats) + len(set(repeats))) / n, 3)
        print(json.dumps(row))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sizes = dict(type=int, nargs="+", default=[2000, 10000, 30000, 60000])
    p = sub.add_parser("seeds")
    p.add_argument("--sizes", **sizes)
    for name, n in (("questions", 256), ("chunk", 64)):
        p = sub.add_parser(name)
        p.add_argument("--sampler", default="varied", choices=sorted(topics.SAMPLERS))
        p.add_argument("--n", type=int, default=n, help="slots (the chunk_size)")
        p.add_argument("--batch_size", type=int, default=64)
        p.add_argument("--out", required=True, help="JSON file for the questions and counts")
    p.add_argument("--max_answer_tokens", type=int, default=64)
    p = sub.add_parser("summary")
    p.add_argument("files", nargs="+", help="JSON files of `questions`")
    p.add_argument("--sizes", **sizes)
    args = ap.parse_args()
    {"seeds": seeds, "questions": questions, "chunk": chunk, "summary": summary}[args.what](args)
