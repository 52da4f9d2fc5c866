"""
Synthetic grade-school math: the project's stand-in for GSM8K / MetaMathQA, small enough for a model trained from
scratch in minutes to solve, so that accuracy against decoding speed is measurable.

What is here: the problem generator (`make_problem`, `make_splits`) and the scorer (`extract_answer`, `score`) that
bench.py uses on any generated text. What is not: tokenization and files (data/prepare.py).

A problem is a chain of 1..N steps on one quantity (add, subtract, multiply, divide, all with exact integer results
that stay within 1..max_number), told with varied names, objects and sentence templates. Its solution is GSM8K-shaped:
one line per step carrying the arithmetic, then the final line `#### <answer>`:

    Question: Maya has 4 bags with 6 marbles in each bag. She gives 5 marbles to Omar. How many marbles does ...
    4 * 6 = 24
    24 - 5 = 19
    #### 19
"""

import random
import re
from dataclasses import dataclass

from tqdm import tqdm

# (name, subject pronoun, object pronoun, possessive)
NAMES = [(n, "she", "her", "her") for n in
         ["Maya", "Lena", "Sofia", "Aisha", "Nora", "Emma", "Priya", "Hana", "Chloe", "Zara", "Mei", "Grace",
          "Julia", "Amara", "Rosa", "Ines", "Yuki", "Fatima", "Olivia", "Tara"]] + \
        [(n, "he", "him", "his") for n in
         ["Omar", "Leo", "Sam", "Ravi", "Tom", "Diego", "Kenji", "Noah", "Felix", "Ali", "Marco", "Ben",
          "Ivan", "Kwame", "Lucas", "Arjun", "Hugo", "Mateo", "Ethan", "Jonas"]]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "coins",
           "candies", "flowers", "crayons", "buttons", "eggs", "oranges", "toy cars", "beads", "balloons", "cupcakes",
           "rocks", "feathers", "erasers", "muffins", "pens", "leaves", "tickets", "blocks", "ribbons", "plums"]
CONTAINERS = ["bags", "boxes", "jars", "baskets", "packs", "crates", "bowls", "trays"]
FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}
MULTIPLES = {2: "doubles", 3: "triples"}

# Sentence templates per operation. {n}: name, {s}/{o}/{p}: pronouns, {x}: object, {b}: operand, {m}: other name.
START = ["{n} has {v} {x}.", "{n} starts with {v} {x}.", "{n} owns {v} {x}.", "There are {v} {x} in {n}'s room."]
GROUPS = ["{n} has {k} {c} with {v} {x} in each.", "{n} buys {k} {c} of {x}, and each holds {v} {x}.",
          "{n} fills {k} {c} with {v} {x} each."]
ADD = ["{S} buys {b} more {x}.", "{m} gives {o} {b} {x}.", "{S} finds {b} more {x}.",
       "Then {n} gets {b} more {x}.", "{S} wins {b} {x} at a fair."]
SUB = ["{S} gives {b} {x} to {m}.", "{S} loses {b} {x}.", "{n} sells {b} of the {x}.",
       "{S} uses {b} {x} for a school project.", "{m} takes {b} {x} from {o}."]
MUL = ["Then the number of {x} {n} has {mult}.", "{S} ends up with {b} times as many {x} as before.",
       "{m} gives {o} enough {x} that {s} now has {b} times as many."]
DIV = ["{S} splits the {x} into {b} equal groups and keeps one group.",
       "{S} keeps {frac} of the {x} and gives the rest away.",
       "{n} shares the {x} equally among {b} friends, {o}self included, and keeps {p} share."]
ASK = ["How many {x} does {n} have now?", "How many {x} does {n} have in the end?",
       "How many {x} does {n} have left?", "In the end, how many {x} does {n} have?"]


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str     # one line per step ("24 - 5 = 19"), then "#### 19"
    answer: int
    steps: int


def make_problem(rng, min_steps=1, max_steps=3, max_number=100, max_factor=5):
    """One problem from a random.Random. Every intermediate value stays in 1..max_number; factors in 2..max_factor."""
    n, s, o, p = rng.choice(NAMES)
    m = rng.choice([nm for nm in NAMES if nm[0] != n])[0]
    x = rng.choice(OBJECTS)
    steps = rng.randint(min_steps, max_steps)
    fill = dict(n=n, s=s, o=o, p=p, S=s.capitalize(), m=m, x=x)
    sentences, lines = [], []

    # the first step may be "k containers with v each" (a multiplication); otherwise the start is stated
    k_max = min(max_factor, max_number // 2)
    if k_max >= 2 and rng.random() < 0.3:
        k = rng.randint(2, k_max)
        v = rng.randint(2, max_number // k)
        sentences.append(rng.choice(GROUPS).format(k=k, v=v, c=rng.choice(CONTAINERS), **fill))
        value = k * v
        lines.append(f"{k} * {v} = {value}")
    else:
        value = rng.randint(2, max_number)
        sentences.append(rng.choice(START).format(v=value, **fill))

    while len(lines) < steps:
        # only the operations whose result is an integer in 1..max_number
        ops = []
        if value < max_number:
            ops.append("add")
        if value > 1:
            ops.append("sub")
        muls = [k for k in range(2, max_factor + 1) if value * k <= max_number]
        divs = [k for k in range(2, max_factor + 1) if value % k == 0]
        if muls:
            ops.append("mul")
        if divs:
            ops.append("div")
        op = rng.choice(ops)
        if op == "add":
            b = rng.randint(1, max_number - value)
            sentences.append(rng.choice(ADD).format(b=b, **fill))
            lines.append(f"{value} + {b} = {value + b}")
            value += b
        elif op == "sub":
            b = rng.randint(1, value - 1)
            sentences.append(rng.choice(SUB).format(b=b, **fill))
            lines.append(f"{value} - {b} = {value - b}")
            value -= b
        elif op == "mul":
            b = rng.choice(muls)
            t = rng.choice([t for t in MUL if "{mult}" not in t or b in MULTIPLES])
            sentences.append(t.format(b=b, mult=MULTIPLES.get(b), **fill))
            lines.append(f"{value} * {b} = {value * b}")
            value *= b
        else:
            b = rng.choice(divs)
            t = rng.choice([t for t in DIV if "{frac}" not in t or b in FRACTIONS])
            sentences.append(t.format(b=b, frac=FRACTIONS.get(b), **fill))
            lines.append(f"{value} / {b} = {value // b}")
            value //= b

    sentences.append(rng.choice(ASK).format(**fill))
    return Problem(" ".join(sentences), "\n".join(lines + [f"#### {value}"]), value, steps)


def make_splits(seed, sizes, **knobs):
    """{split: n} -> {split: [Problem]}, deterministic for a seed. Splits are drawn in the order given (put the
    held-out ones first, so they do not change when the training set grows) and share no question."""
    rng = random.Random(seed)
    seen, out = set(), {}
    for split, n in sizes.items():
        problems, tries = [], 0
        bar = tqdm(total=n, desc=f"generating {split}", unit=" problems", leave=False)
        while len(problems) < n:
            pr = make_problem(rng, **knobs)
            tries += 1
            if pr.question not in seen:
                seen.add(pr.question)
                problems.append(pr)
                bar.update(1)
            elif tries > 20 * n + 1000:
                raise ValueError(f"synthmath: only {len(problems)} distinct problems for split {split!r} after "
                                 f"{tries} tries; raise max_number/max_steps or ask for fewer")
        bar.close()
        out[split] = problems
    return out


# ----------------------------------------------------------------------------------------------------------------
# scoring any generated text

# a number: "1,234" with thousands separators, or plain digits; optional decimals. A minus sign counts only when it
# does not follow a word character, so "5-3" yields 5 and 3, not -3.
NUMBER = re.compile(r"(?:(?<![\w-])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
ANSWER_MARKERS = [re.compile(r"####"), re.compile(r"answer is\s*:?", re.IGNORECASE)]


def _normalize(num):
    num = num.replace(",", "")
    if "." in num:
        f = float(num)
        return str(int(f)) if f.is_integer() else repr(f)
    return str(int(num))


def extract_answer(text):
    """The final answer in a model's text, as a normalized number string ("1234", "-5", "2.5"), or None.
    Looks, in order, at the first number after the first '####', after the first 'answer is', then at the last
    number in the text. Text after the answer (a model that keeps going) is ignored."""
    for marker in ANSWER_MARKERS:
        for hit in marker.finditer(text):
            num = NUMBER.search(text, hit.end())
            # the number must follow the marker closely ("#### 42", "The answer is: $42"), not sit lines later
            if num and len(text[hit.end():num.start()].strip(" $:*\t")) == 0:
                return _normalize(num.group())
    nums = NUMBER.findall(text)
    return _normalize(nums[-1]) if nums else None


def score(text, gold):
    """True when the final answer extracted from `text` equals the gold answer (a number or its string)."""
    pred = extract_answer(text)
    return pred is not None and pred == _normalize(str(gold))
