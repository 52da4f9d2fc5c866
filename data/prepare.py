"""
Prepare a dataset into token files: the one command line of data/.

    python data/prepare.py synthmath --out data/synthmath --seed 0                         # from-scratch math
    python data/prepare.py selfgen --init_from smollm2 --out data/chat --n 50000 --batch_size 1024 --device cuda
    python data/prepare.py jsonl --file MetaMathQA-395K.json --format metamathqa --tokenizer smollm2 --out data/mmqa
    python data/prepare.py jsonl --file train.jsonl --format field --prompt_field q --answer_field a --out ...
    python data/prepare.py text --file input.txt --tokenizer chars --out data/text

What is here: the command line, prompt formatting, splitting, and writing a folder (layout in data/dataset.py).
What is not: the generators and readers (data/synthmath.py, data/selfgen.py, data/readers.py), reading the folder back
(data/dataset.py). The same arguments always give byte-identical files; an existing folder is only replaced with
--overwrite, and only if it is a prepared folder (has meta.json).
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
from tqdm import tqdm

# `python data/prepare.py` puts data/ on the path; the project's modules (load.py, decode.py, data/) live one level up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import Parser, fail  # noqa: E402
from data.dataset import FORMAT, dtype_for, fingerprint  # noqa: E402
from data.readers import read_examples, read_text  # noqa: E402
from data.synthmath import make_splits  # noqa: E402
from artefacts import recover_checkpoint  # noqa: E402
from load import BUNDLED, bundled_gguf, load  # noqa: E402
from chat import CHATML_END  # noqa: E402
from files import plural  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

PLAIN_PROMPT = "Question: {question}\nAnswer:\n"   # the prompt format of models without a chat template


# ----------------------------------------------------------------------------------------------------------------
# tokenizers and prompts

def get_tokenizer(name, device="cpu", dtype=None, with_model=False):
    """'chars', 'smollm2', a .gguf file or a model folder -> its tokenizer, read without the weights (seconds
    faster) unless with_model, which returns (tokenizer, model)."""
    if with_model:
        model, tokenizer = load(name, device=device, dtype=dtype or torch.float32)
        return tokenizer, model
    if name != BUNDLED:
        recover_checkpoint(name)      # as load does: a train.py checkpoint may sit in .NAME.old
    return load_tokenizer(bundled_gguf() if name == BUNDLED else name)


def use_chat(tokenizer, chat):
    """--chat auto: chat format whenever the tokenizer has a (ChatML) chat template."""
    if chat == "yes" and not tokenizer.has_chat:
        raise ValueError(f"--chat yes: tokenizer {tokenizer.name!r} has no ChatML chat template")
    return tokenizer.has_chat if chat == "auto" else chat == "yes"


def encode_pair(tokenizer, question, answer, chat, system=None):
    """(prompt text as fed to the model, prompt ids, answer ids ending with the end-of-turn token). Every text is
    plain text: only the chat template adds control tokens. A question holding a special-token string is refused:
    in the prompts file, whose text bench encodes with specials=True, it would become a control token."""
    for text in (question, system or ""):
        found = [s for s in tokenizer.special if s in text]
        if found:
            raise ValueError(f"the text holds the special token {found[0]!r}, which the prompts file could not tell "
                             f"from the chat template's own")
    if chat:
        return tokenizer.chat_prompt(question, system), tokenizer.encode_chat(question, system), \
            tokenizer.encode(answer) + [tokenizer.special[CHATML_END]]
    prompt = PLAIN_PROMPT.format(question=question)
    return prompt, tokenizer.encode(prompt), tokenizer.encode(answer) + [tokenizer.eos_id]


# ----------------------------------------------------------------------------------------------------------------
# writing a folder

def check_out(out, overwrite):
    """Fail before any work if `out` would be silently replaced."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not overwrite:
            raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it")
        if not os.path.exists(os.path.join(out, "meta.json")):
            raise FileExistsError(f"{out}: exists and is not a prepared data folder (no meta.json); "
                                  f"refusing to delete it even with --overwrite")


def write_split(folder, split, rows, dtype, has_prompts):
    """rows: (prompt_text, prompt_ids, answer_ids, answer_for_prompts_jsonl). Returns the split's counts."""
    lengths = np.array([len(p) + len(a) for _, p, a, _ in rows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    loss_weight = np.zeros(len(tokens), dtype=np.uint8)
    index = np.empty((len(rows), 3), dtype=np.int64)
    for i, (_, p, a, _) in enumerate(tqdm(rows, desc=f"writing {split}", unit=" ex", leave=False)):
        s = int(starts[i])
        tokens[s:s + len(p)] = p
        tokens[s + len(p):s + len(p) + len(a)] = a
        loss_weight[s + len(p):s + len(p) + len(a)] = 1      # the answer is what the loss sees
        index[i] = (s, len(p), len(p) + len(a))
    tokens.tofile(os.path.join(folder, f"{split}.bin"))
    index.tofile(os.path.join(folder, f"{split}_index.bin"))
    if has_prompts:
        loss_weight.tofile(os.path.join(folder, f"{split}_loss_mask.bin"))
        with open(os.path.join(folder, f"{split}_prompts.jsonl"), "w", encoding="utf-8") as f:
            for prompt, _, _, answer in rows:
                f.write(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n")
    return {"examples": len(rows), "tokens": len(tokens), "answer_tokens": int(loss_weight.sum())}


def write_folder(out, tokenizer, splits, task, has_prompts, chat, args, extra=None):
    """Write {split: rows} and meta.json into `out`, through a .partial folder so a crash leaves no valid-looking
    half folder. Empty splits are left out; nothing at all is an error."""
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        raise ValueError(f"{out}: nothing to write: every split is empty (see the filter counts above)")
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = dtype_for(tokenizer.vocab_size)
    counts = {split: write_split(tmp, split, rows, dtype, has_prompts) for split, rows in splits.items()}
    os.makedirs(os.path.join(tmp, "tokenizer"))
    tokenizer.save(os.path.join(tmp, "tokenizer"))
    # the arguments that made the folder, less the ones that do not change its contents
    recorded = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "device")}
    meta = {"format": FORMAT, "source": args.source, "task": task, "chat": chat, "has_prompts": has_prompts,
            "tokenizer": fingerprint(tokenizer), "dtype": dtype, "splits": counts, "args": recorded, **(extra or {})}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    if os.path.exists(out):
        shutil.rmtree(out)   # check_out allowed it: --overwrite and a prepared folder
    os.rename(tmp, out)
    for split, c in counts.items():
        print(f"{out}/{split}: {plural(c['examples'], 'example')}, {plural(c['tokens'], 'token')} "
              f"({c['answer_tokens']:,} answer)")


def split_examples(items, n_val, n_test, seed):
    """Shuffle (deterministically) and cut into val, test, train: held-out splits first, the rest trains."""
    items = list(items)
    random.Random(seed).shuffle(items)
    if n_val + n_test > len(items):
        raise ValueError(f"--n_val {n_val} + --n_test {n_test} exceed the {len(items)} distinct examples")
    return {"val": items[:n_val], "test": items[n_val:n_val + n_test], "train": items[n_val + n_test:]}


# ----------------------------------------------------------------------------------------------------------------
# the four sources

def prepare_synthmath(args):
    if not 1 <= args.min_steps <= args.max_steps:
        raise ValueError(f"--min_steps {args.min_steps}, --max_steps {args.max_steps}: need "
                         f"1 <= --min_steps <= --max_steps")
    if args.max_number < 2:
        raise ValueError(f"--max_number {args.max_number}: must be at least 2")
    sizes = {"val": args.n_val, "test": args.n_test, "train": args.n_train}
    if min(sizes.values()) < 0 or not any(sizes.values()):
        raise ValueError(f"--n_train {args.n_train}, --n_val {args.n_val}, --n_test {args.n_test}: "
                         f"need counts of at least 0, not all 0")
    tokenizer = get_tokenizer(args.tokenizer)
    chat = use_chat(tokenizer, args.chat)
    knobs = dict(min_steps=args.min_steps, max_steps=args.max_steps, max_number=args.max_number,
                 max_factor=args.max_factor)
    problems = make_splits(args.seed, sizes, **knobs)
    splits = {}
    for split, probs in problems.items():
        rows = []
        for pr in tqdm(probs, desc=f"tokenizing {split}", unit=" ex", leave=False):
            prompt, p, a = encode_pair(tokenizer, pr.question, pr.solution, chat, args.system)
            rows.append((prompt, p, a, str(pr.answer)))
        splits[split] = rows
    write_folder(args.out, tokenizer, splits, "math", True, chat, args)


def prepare_selfgen(args):
    """Make the missing chunks of this call's shard into {out}.chunks/ (stopping before --time_limit), then, once
    every chunk exists and this is not a shard, merge them into the folder. Rerunning the command resumes."""
    import torch
    from data import selfgen
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"--dtype {dtype}: not bfloat16, float16 or float32")
    if not 0 <= args.shard < args.n_shards:
        raise ValueError(f"--shard {args.shard}: must lie in 0..{args.n_shards - 1} (--n_shards {args.n_shards})")
    if args.chunk_size < 1 or args.batch_size < 1 or args.question_rounds < 1:
        raise ValueError("--chunk_size, --batch_size and --question_rounds must be at least 1")
    derived = (args.passage_share, args.followup_share, args.phrase_share)
    if not (min(derived) >= 0 and sum(derived) < 1 and 0 <= args.magpie_share <= 1):
        raise ValueError("--magpie_share must lie in [0, 1], --passage_share, --followup_share and "
                         "--phrase_share in [0, 1) with a sum below 1 (first turns need the rest)")
    settings = selfgen.Settings(**{f.name: getattr(args, f.name) for f in fields(selfgen.Settings)})
    n_total = args.n + args.n_val + args.n_test
    n_chunks = math.ceil(n_total / args.chunk_size)
    work = args.out.rstrip("/") + ".chunks"
    config = {"init_from": args.init_from, "dtype": dtype, **asdict(settings)}
    open_work_folder(work, config, selfgen.SETTINGS_ADDED)
    todo = [c for c in range(args.shard, n_chunks, args.n_shards) if not os.path.exists(chunk_path(work, c))]
    t0, last = time.time(), 0.0
    if todo:
        tok, model = get_tokenizer(args.init_from, args.device, getattr(torch, dtype), with_model=True)
        model.eval()
        for i, c in enumerate(todo):
            if i and args.time_limit is not None and time.time() - t0 + last > args.time_limit:
                break
            t = time.time()
            with torch.no_grad():
                chunk = selfgen.generate_chunk(model, tok, c, settings)
            last = chunk["seconds"] = round(time.time() - t, 2)
            write_json_atomic(chunk_path(work, c), chunk)
            print(f"chunk {c} of {n_chunks}: {len(chunk['records'])} conversations in {last:.1f} s")
    missing = [c for c in range(n_chunks) if not os.path.exists(chunk_path(work, c))]
    if missing:
        print(f"{len(missing)} of {n_chunks} chunks still to make in {work}: run the same command again")
        return
    if args.n_shards > 1:
        print(f"all {n_chunks} chunks are in {work}: run the command without --shard/--n_shards to write {args.out}")
        return

    tok = get_tokenizer(args.init_from)
    chunks = []
    for c in range(n_chunks):
        with open(chunk_path(work, c)) as f:
            try:
                chunks.append(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{chunk_path(work, c)}: not a chunk file ({e}); delete it to make it again") from None
    records, counts = selfgen.merge_chunks(chunks, tok, args.min_answer_tokens, not args.drop_truncated)
    stats = selfgen.describe(records, counts, args.max_answer_tokens)
    timing = {"chunks": n_chunks, "generation_seconds": round(sum(c["seconds"] for c in chunks), 1)}
    print(f"kept {len(records)} of {n_total} asked; filter counts: {counts}")
    print(f"statistics: {json.dumps(stats)}")
    print(f"generation: {timing['generation_seconds']:.1f} s over {n_chunks} chunks")
    splits = {}
    for split, recs in selfgen.split_conversations(records, args.n_val, args.n_test, args.seed).items():
        rows = []
        for r in tqdm(recs, desc=f"tokenizing {split}", unit=" ex", leave=False):
            prompt = tok.chat_prompt(r["messages"], system=args.system)
            rows.append((prompt, tok.encode(prompt, specials=True), r["answer"], selfgen.answer_text(tok, r["answer"])))
        splits[split] = rows
    # how the work was spread over calls does not change the folder, so it is not recorded
    recorded = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("time_limit", "shard",
                                                                                       "n_shards")})
    write_folder(args.out, tok, splits, "chat", True, True, recorded,
                 {"filter_counts": counts, "stats": stats, "timing": timing})


def chunk_path(work, c):
    return os.path.join(work, f"chunk_{c:05d}.json")


def open_work_folder(work, config, added=None):
    """Create the chunk folder with its config.json, or check that the chunks already there used
    this config. added: settings that came after some chunk folders were made, with the value
    those folders' chunks had."""
    config_path = os.path.join(work, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            old = {**(added or {}), **json.load(f)}
        if old != config:
            diff = sorted(k for k in old.keys() | config.keys() if old.get(k) != config.get(k))
            raise ValueError(f"{work}: its chunks were made with other settings ({', '.join(diff)}); delete that "
                             f"folder or choose another --out")
        return
    os.makedirs(work, exist_ok=True)
    write_json_atomic(config_path, config)


def write_json_atomic(path, obj):
    """Through a temporary file, so an interrupted call leaves no half-written chunk behind."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


def encode_example(tokenizer, e, documents, chat, system):
    if documents:
        return "", [], tokenizer.encode(e.answer) + [tokenizer.eos_id], None
    prompt, p, a = encode_pair(tokenizer, e.prompt, e.answer, chat, system)
    return prompt, p, a, e.gold if e.gold is not None else e.answer


def prepare_jsonl(args):
    tokenizer = get_tokenizer(args.tokenizer)
    examples, skipped = read_examples(args.file, args.format, args.field, args.prompt_field, args.answer_field,
                                   args.skip_bad)
    if skipped:
        print(f"{args.file}: skipped {plural(skipped, 'malformed line')} (--skip_bad)")
    if not examples:
        raise ValueError(f"{args.file}: no examples read")
    documents = args.format == "field" and args.field is not None
    chat = False if documents else use_chat(tokenizer, args.chat)
    # duplicates would leak across splits: keep the first of each prompt (of each text, for documents)
    first = {}
    for e in examples:
        first.setdefault(e.answer if documents else e.prompt, e)
    distinct = list(first.values())
    print(f"{args.file}: {plural(len(examples), 'example')}, {len(distinct):,} distinct")
    splits = {}
    for split, exs in split_examples(distinct, args.n_val, args.n_test, args.seed).items():
        rows = []
        for e in tqdm(exs, desc=f"tokenizing {split}", unit=" ex", leave=False):
            try:
                rows.append(encode_example(tokenizer, e, documents, chat, args.system))
            except ValueError as err:   # e.g. a character the chars tokenizer lacks
                raise ValueError(f"{args.file}: example {e.prompt[:60]!r}: {err}") from None
        splits[split] = rows
    task = "text" if documents else ("math" if args.format in ("gsm8k", "metamathqa") else "qa")
    write_folder(args.out, tokenizer, splits, task, not documents, chat, args, {"skipped_lines": skipped})


def prepare_text(args):
    tokenizer = get_tokenizer(args.tokenizer)
    (doc,) = read_text(args.file)
    try:
        ids = tokenizer.encode(doc.answer) + [tokenizer.eos_id]
    except ValueError as e:   # e.g. a character the chars tokenizer lacks
        raise ValueError(f"{args.file}: {e}") from None
    # contiguous cuts, nanoGPT style: train | val | test
    n_val, n_test = int(len(ids) * args.val_frac), int(len(ids) * args.test_frac)
    n_train = len(ids) - n_val - n_test
    cuts = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    splits = {k: [("", [], v, None)] if v else [] for k, v in cuts.items()}
    write_folder(args.out, tokenizer, splits, "text", False, False, args)


# ----------------------------------------------------------------------------------------------------------------
# command line

def main(argv=None):
    ap = Parser(description="Prepare a dataset into token files for train.py and bench.py.")
    sub = ap.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def common(p, tokenizer_default):
        p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder at --out")
        p.add_argument("--seed", type=int, default=0, help="seed of generation, shuffling and sampling")
        if tokenizer_default is not None:
            p.add_argument("--tokenizer", default=tokenizer_default,
                           help="'chars' (character level, for from-scratch models) or a model load.load() takes "
                                "(smollm2, a Hugging Face folder, a .gguf file); must match the model trained on it")

    def prompting(p):
        p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                       help="wrap questions in the tokenizer's chat template (auto: when it has one); otherwise "
                            "'Question: ...\\nAnswer:\\n'")
        p.add_argument("--system", default=None, help="system prompt for the chat template (default: the template's)")

    p = sub.add_parser("synthmath", help="synthetic grade-school math problems (data/synthmath.py)")
    common(p, "chars")
    prompting(p)
    p.add_argument("--n_train", type=int, default=100_000, help="training problems")
    p.add_argument("--n_val", type=int, default=500, help="validation problems")
    p.add_argument("--n_test", type=int, default=500, help="test problems (bench.py's held-out prompts)")
    p.add_argument("--min_steps", type=int, default=1, help="fewest reasoning steps per problem")
    p.add_argument("--max_steps", type=int, default=3, help="most reasoning steps per problem")
    p.add_argument("--max_number", type=int, default=100, help="largest number in a problem, intermediate results too")
    p.add_argument("--max_factor", type=int, default=5, help="largest multiplier / divisor")

    p = sub.add_parser("selfgen", help="Magpie-style chat data written and answered by the model itself")
    common(p, None)
    p.add_argument("--init_from", default="smollm2", help="the instruct model (anything load.load() takes)")
    p.add_argument("--n", type=int, default=50_000,
                   help="training conversations to aim for; with --n_val and --n_test this sets the number of chunks "
                        "(dedup and answer filters keep a little fewer; a larger --n later reuses the chunks made)")
    p.add_argument("--n_val", type=int, default=256, help="validation conversations")
    p.add_argument("--n_test", type=int, default=256, help="test conversations (bench.py's held-out prompts)")
    p.add_argument("--chunk_size", type=int, default=2048,
                   help="conversations per chunk, the unit saved to {out}.chunks/ and resumed; changes the data")
    p.add_argument("--time_limit", type=float, default=None,
                   help="seconds: start no new chunk that would end past this (at least one chunk is made); "
                        "rerun the same command to continue")
    p.add_argument("--shard", type=int, default=0, help="with --n_shards: make only chunks c with c %% k == shard")
    p.add_argument("--n_shards", type=int, default=1,
                   help="k processes (e.g. one per GPU) share the chunks; a last call without it writes the folder")
    p.add_argument("--batch_size", type=int, default=512,
                   help="sequences per generate call (256-1024 on a GPU); changes the data")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", default=None,
                   help="model dtype: bfloat16, float16 or float32 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--system", default=None, help="system prompt for the chat template (default: the template's)")
    p.add_argument("--magpie_share", type=float, default=0.2,
                   help="share of first turns the model writes from nothing; the rest continue a task x topic "
                        "opening from data/topics.py")
    p.add_argument("--passage_share", type=float, default=0.1,
                   help="share of conversations asking about a passage of one of the model's earlier answers")
    p.add_argument("--followup_share", type=float, default=0.1, help="share of two-turn conversations")
    p.add_argument("--phrase_share", type=float, default=0.1,
                   help="share of first turns asking about a phrase of another answer of the chunk")
    p.add_argument("--sampler", default="varied", choices=["tasks", "varied"],
                   help="seeded openings (data/topics.py): varied adds tasks, personas and answer "
                        "forms; tasks (with --phrase_share 0) made the chunks from before it")
    p.add_argument("--question_temperature", type=float, default=1.0, help="sampling temperature of the questions")
    p.add_argument("--question_top_p", type=float, default=0.95, help="top-p of the questions")
    p.add_argument("--question_rounds", type=int, default=3,
                   help="attempts per question slot (a question that fails a filter is sampled again)")
    p.add_argument("--max_question_tokens", type=int, default=96, help="longer questions are dropped as truncated")
    p.add_argument("--min_question_chars", type=int, default=10, help="shorter questions are dropped")
    p.add_argument("--max_passage_tokens", type=int, default=160, help="longest passage embedded in a question")
    p.add_argument("--answer_temperature", type=float, default=0.0,
                   help="0 = greedy answers (what lossless drafting predicts); e.g. 0.7 samples them, to compare "
                        "as training data")
    p.add_argument("--max_answer_tokens", type=int, default=512,
                   help="answers are cut here (and kept, see --drop_truncated)")
    p.add_argument("--min_answer_tokens", type=int, default=2, help="shorter answers are dropped")
    p.add_argument("--drop_truncated", action="store_true",
                   help="drop answers cut at --max_answer_tokens (kept by default: still the model's own tokens)")

    p = sub.add_parser("jsonl", help="a JSONL file: MetaMathQA, GSM8K, or chosen fields")
    common(p, "smollm2")
    prompting(p)
    p.add_argument("--file", required=True, help="the .jsonl file, one JSON object per line")
    p.add_argument("--format", required=True, choices=["metamathqa", "gsm8k", "field"],
                   help="metamathqa: query/response; gsm8k: question/answer with '#### N'; field: see --field")
    p.add_argument("--field", default=None, help="format field: the one text field of plain documents")
    p.add_argument("--prompt_field", default=None, help="format field: the prompt field (with --answer_field)")
    p.add_argument("--answer_field", default=None, help="format field: the answer field (with --prompt_field)")
    p.add_argument("--n_val", type=int, default=500, help="validation examples")
    p.add_argument("--n_test", type=int, default=500, help="test examples")
    p.add_argument("--skip_bad", action="store_true", help="skip and count malformed lines instead of stopping")

    p = sub.add_parser("text", help="a plain UTF-8 text file")
    common(p, "chars")
    p.add_argument("--file", required=True, help="the text file")
    p.add_argument("--val_frac", type=float, default=0.1, help="fraction of tokens, from the end, for validation")
    p.add_argument("--test_frac", type=float, default=0.0, help="fraction of tokens, at the very end, for test")

    args = ap.parse_args(argv)
    check_out(args.out, args.overwrite)
    t0 = time.time()
    {"synthmath": prepare_synthmath, "selfgen": prepare_selfgen, "jsonl": prepare_jsonl,
     "text": prepare_text}[args.source](args)
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:   # bad input: the message names the file and the problem
        fail(e)
