"""
Self-generated chat data (Magpie, Xu et al. 2024): the bundled instruct model writes the user questions itself, then
answers them. This is the data for distilling MTP heads or mask-token MTP into that same model: its own greedy answers
are exactly what a lossless draft must predict (sampled answers trained clearly worse, see MEASURED.md).

What is here: `self_generate`, the batched question-then-answer loop with its filters. What is not: loading the model,
tokenizing to files, splitting (data/prepare.py), the decoding loop itself (decode.generate).

1. Questions: the chat template up to the user's turn (`<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n`) is fed
   to the model, which continues with a plausible user message; sampled (temperature, top-p) for variety. Kept when it
   ended with a stop token, is long enough, holds no special token, and is new (case and spacing ignored).
2. Answers: each question in the full chat prompt, decoded greedily by default; kept when it has at least
   min_answer_tokens tokens and no special token before its end. Answers cut at max_answer_tokens are kept by default:
   every token is still the model's own greedy choice, which is all head distillation needs, and dropping them would
   bias the data towards short answers (with the bundled model at 128 tokens, about 60% were cut).
"""

import math

from tqdm import tqdm

SENTINEL = "\u2063QUESTION\u2063"   # stands for the user's text, to cut the template right where it would begin


def query_prefix(tok, system=None):
    """The chat template's opening up to where the user's message begins, e.g. '...<|im_start|>user\\n'."""
    full = tok.chat_prompt(SENTINEL, system=system)
    return full[:full.index(SENTINEL)]


def split_stop(ids, stop_ids, max_new_tokens):
    """Generated ids -> (ids without a trailing stop token, the stop token or None, finished?)."""
    if ids and ids[-1] in stop_ids:
        return ids[:-1], ids[-1], True
    return ids, None, len(ids) < max_new_tokens   # stopped early without echoing the stop token


def self_generate(model, tok, n, batch_size, question_temperature=1.0, question_top_p=0.95, max_question_tokens=96,
                  min_question_chars=10, answer_temperature=0.0, max_answer_tokens=256, min_answer_tokens=2,
                  keep_truncated=True, system=None, max_rounds=None, generator=None, generate=None):
    """Up to n (question, prompt_text, prompt_ids, answer_ids) records in generation order, plus a dict counting what
    each filter dropped (and the truncated answers kept). answer_ids end with the stop token that ended the answer,
    if it did end. `generate` defaults to decode.generate (tests pass one that scripts the model's outputs)."""
    if generate is None:
        from decode import generate
    stop_ids = list(tok.stop_ids)
    specials = set(tok.special.values())
    # the chat template closes a turn with <|im_end|>; used when generate did not return the stop token it met
    end_id = tok.special.get("<|im_end|>", tok.eos_id)
    counts = dict(question_truncated=0, question_short=0, question_special=0, question_duplicate=0,
                  answer_truncated=0, answer_short=0, answer_special=0, kept_truncated_answers=0)

    # 1. questions, sampled from the template's opening, one batch of identical prompts per round
    prefix = tok.encode(query_prefix(tok, system), specials=True)
    max_rounds = max_rounds or 4 * math.ceil(n / batch_size) + 4
    questions, seen = [], set()
    bar = tqdm(total=n, desc="questions", unit=" q")
    for _ in range(max_rounds):
        outs = generate(model, [prefix] * batch_size, max_question_tokens, temperature=question_temperature,
                        top_p=question_top_p, stop_ids=stop_ids, generator=generator)
        for ids in outs:
            ids, _, finished = split_stop(list(ids), stop_ids, max_question_tokens)
            text = tok.decode(ids).strip()
            key = " ".join(text.lower().split())
            if not finished:
                counts["question_truncated"] += 1
            elif specials & set(ids):
                counts["question_special"] += 1
            elif len(text) < min_question_chars:
                counts["question_short"] += 1
            elif key in seen:
                counts["question_duplicate"] += 1
            elif len(questions) < n:
                seen.add(key)
                questions.append(text)
                bar.update(1)
        if len(questions) >= n:
            break
    bar.close()
    if len(questions) < n:
        print(f"warning: only {len(questions)} of {n} questions after {max_rounds} rounds (counts: {counts})")

    # 2. answers; batches of similar prompt length waste less padding, results go back in question order
    prompts = [tok.chat_prompt(q, system=system) for q in questions]
    prompt_ids = [tok.encode_chat(q, system=system) for q in questions]   # a question is plain text
    order = sorted(range(len(prompts)), key=lambda i: (len(prompt_ids[i]), i))
    answers = [None] * len(prompts)
    for b in tqdm(range(0, len(order), batch_size), desc="answers", unit=" batch"):
        rows = order[b:b + batch_size]
        outs = generate(model, [prompt_ids[i] for i in rows], max_answer_tokens, temperature=answer_temperature,
                        stop_ids=stop_ids, generator=generator)
        for i, ids in zip(rows, outs):
            answers[i] = list(ids)

    records = []
    for q, p, pids, ids in zip(questions, prompts, prompt_ids, answers):
        ids, stop, finished = split_stop(ids, stop_ids, max_answer_tokens)
        if not finished and not keep_truncated:
            counts["answer_truncated"] += 1
        elif specials & set(ids):
            counts["answer_special"] += 1
        elif len(ids) < min_answer_tokens:
            counts["answer_short"] += 1
        else:
            tail = [] if not finished else [stop if stop is not None else end_id]
            counts["kept_truncated_answers"] += not finished
            records.append((q, p, pids, ids + tail))
    return records, counts
