"""Long-context tasks generated locally from a seed, with the length measured in the evaluated model's tokens.

Every example is a dict in LongBench's schema plus fields of ours:
  instruction (the task's preamble, before the context, as InfiniteBench and RULER place it), context, input
  (the question, ending with an answer lead such as "The pass key is"), answers, dataset, length (tokens of
  instruction + context + input), depth (where the needle sits, 0 = start, 1 = end), needles (character
  offsets of the needle sentences in `context`, the one asked about first, for telling ranking errors from
  reading errors).
instruction + context + input is the whole prompt, the same for full attention and ParallelComp. ParallelComp
gets the instruction as its header (parallelcomp.answer(instruction=...)): every chunk reads it, and the chunks
are scored by the question alone. (Two layouts measured worse on SmolLM2-135M, see eval/README: the
instruction in the first chunk only, where chunks without it are misread; and the instruction inside the
question, where I_c averages the needle's signal over the instruction's tokens and noise chunks outrank it.)

Tasks (`TASKS`):
  passkey, number_string   InfiniteBench's construction: the noise line repeated, one needle sentence
  kv_retrieval             InfiniteBench: a JSON object of random UUID key/value pairs; ask for one key
  niah_single              RULER: "One of the special magic numbers for KEY is: N." in the noise
  niah_multikey            RULER: the same with 3 distractor needles for other keys
  niah_multivalue          RULER: 4 values for one key; all 4 must be named
  niah_multiquery          RULER: 4 keys asked at once; all 4 values must be named
  vt                       RULER variable tracking: VAR X = N, then 4 hops VAR Y = VAR X; name all 5
  kjv_niah                 niah_single inside the King James Bible (Debian's bible-kjv package prints it)
  kjv_multi                4 key-value needles spread through the King James Bible, one question per needle
                           (`questions`); for document sessions (eval.synthetic --session)
Depths are evenly spread over the n examples of a cell (0, 1/(n-1), ..., 1), as InfiniteBench spreads them.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import uuid

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
INFO = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. " \
       "I will quiz you about the important information.\n\n"
RULER_NIAH = "Some special magic numbers are hidden within the following text. Make sure to memorize it. " \
             "I will quiz you about the numbers afterwards.\n"
RULER_VT = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
KJV_NIAH = "A special magic number is hidden within the following text. Make sure to memorize it. " \
           "I will quiz you about it afterwards.\n"
KJV_MULTI = "Some special magic numbers are hidden within the following text. Make sure to memorize them. " \
            "I will quiz you about them afterwards.\n"
KV = "Extract the value corresponding to the specified key in the JSON object below.\n\n"
# RULER draws its needle keys from a word list; these are ours
WORDS = ("amber anchor apple arrow autumn badge basket beacon berry blossom bottle bridge bronze bucket cabin "
         "candle canyon carpet castle cedar cherry circle cloud clover comet copper coral cotton crystal dagger "
         "desert dolphin dragon eagle ember falcon feather fern forest fossil garden garnet ginger glacier "
         "harbor hazel helmet honey island ivory jacket jasmine jungle kettle ladder lantern lemon lily marble "
         "meadow mirror monkey needle oasis olive onion orchid otter paddle parrot pebble pepper pillow planet "
         "pocket quartz rabbit raven ribbon river rocket saddle salmon scarlet shadow silver spider spring "
         "statue summit thunder tiger timber tulip valley velvet violet walnut willow window winter wizard").split()


class TaskError(ValueError):
    """A task name or size that cannot be generated; the message says what is possible."""


def kjv_text() -> str:
    """The King James Bible as plain text, printed by Debian's `bible` program (package bible-kjv)."""
    if shutil.which("bible") is None:
        raise TaskError("the kjv_niah task needs the `bible` program: apt-get install bible-kjv")
    out = subprocess.run(["bible", "Genesis1:1-Revelation22:21"], capture_output=True, text=True, check=True)
    return out.stdout


# ----------------------------------------------------------------------------------------------------
# Building a haystack of a given token length


class Haystack:
    """Filler units (lines) with their token counts, taken in order until a token budget is filled; needles are
    placed between units at a depth measured in tokens."""

    def __init__(self, tokenizer, units: list[str]):
        self.units = units
        self.lengths = [len(tokenizer.encode(u)) for u in units]

    def build(self, budget: int, needles: list[tuple[float, str]], start: int = 0) -> tuple[str, list[int]]:
        """Units from `start` (cycling) up to `budget` tokens, with each (depth, sentence) needle inserted at the
        unit boundary nearest that share of the tokens. Returns (text, character offset of each needle, in the
        order given)."""
        taken, total, i = [], 0, start
        while total < budget:
            j = i % len(self.units)
            if total + self.lengths[j] > budget and taken:
                break
            taken.append(self.units[j])
            total += self.lengths[j]
            i += 1
        acc, cum = 0, [0]  # cum[k]: tokens before unit k
        for k in range(len(taken)):
            acc += self.lengths[(start + k) % len(self.units)]
            cum.append(acc)
        slots = {}
        for n, (depth, sentence) in enumerate(needles):
            target = depth * total
            slot = min(range(len(cum)), key=lambda s: abs(cum[s] - target))
            slots.setdefault(slot, []).append((n, sentence))
        parts, offsets, pos = [], [0] * len(needles), 0
        for k in range(len(taken) + 1):
            for n, sentence in slots.get(k, []):
                offsets[n] = pos
                parts.append(sentence)
                pos += len(sentence)
            if k < len(taken):
                parts.append(taken[k])
                pos += len(taken[k])
        return "".join(parts), offsets


def _key(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# ----------------------------------------------------------------------------------------------------
# The tasks: each returns (instruction, needles [(depth, sentence)], question, answers, filler)


def _passkey(rng, depth):
    key = _number(rng, 5)
    return INFO, [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.\n")], \
        "What is the pass key? The pass key is", [key], "noise"


def _number_string(rng, depth):
    digits = [str(rng.randint(0, 9)) for _ in range(5)]
    for k in range(5):  # InfiniteBench doubles 5 random digits of 5 to make 10
        pos = rng.randint(0, 5 + k - 1)
        digits.insert(pos, digits[pos])
    key = "".join(digits)
    return INFO.replace(" and memorize it", "").replace("information.", "information there."), \
        [(depth, f"The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n")], \
        "What is the sequence of digits? The sequence of digits is", [key], "noise"


def _niah(rng, depth, distractors=0, values=1, queries=1, haystack="noise"):
    keys = []
    while len(keys) < max(queries, 1 + distractors):
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    needles, answers = [], []
    asked = keys[:queries]
    for i, k in enumerate(keys):
        for v in range(values if i == 0 else 1):
            n = _number(rng)
            d = depth if (i == 0 and v == 0) else rng.random()
            needles.append((d, f"One of the special magic numbers for {k} is: {n}.\n"))
            if k in asked:
                answers.append(n)
    if queries > 1:
        names = ", ".join(asked[:-1]) + f", and {asked[-1]}"
        q = (f"\nWhat are all the special magic numbers for {names} mentioned in the provided text? "
             f"The special magic numbers for {names} mentioned in the provided text are")
    elif values > 1:
        q = (f"\nWhat are all the special magic numbers for {keys[0]} mentioned in the provided text? "
             f"The special magic numbers for {keys[0]} mentioned in the provided text are")
    else:
        q = (f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
             f"The special magic number for {keys[0]} mentioned in the provided text is")
    return (KJV_NIAH if haystack == "kjv" else RULER_NIAH), needles, q, answers, haystack


def _vt(rng, depth, hops=4):
    names = []
    while len(names) < hops + 1:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in names:
            names.append(n)
    value = _number(rng, 5)
    lines = [f"VAR {names[0]} = {value}.\n"] + [f"VAR {names[i + 1]} = VAR {names[i]}.\n" for i in range(hops)]
    # the chain starts at `depth` and its hops follow in order through the rest of the text
    depths = [depth + (1 - depth) * i / (hops + 1) for i in range(hops + 1)]
    q = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
         f"According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
         f"assgined the value {value}, they are:")
    return RULER_VT, list(zip(depths, lines)), q, names, "noise"


def _kjv_multi(rng, depth, needles=4):
    """Several key-value needles spread through a King James Bible haystack, one question per needle: needle j at
    depth (j + depth) / needles. The example's `questions` lists them; `input`/`answers` are the first. Made for
    document sessions (eval.synthetic --session: one encoding, each question over it; without it, one-shot)."""
    keys = []
    while len(keys) < needles:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    values = [_number(rng) for _ in keys]
    placed = [((j + depth) / needles, f"One of the special magic numbers for {k} is: {v}.\n")
              for j, (k, v) in enumerate(zip(keys, values))]
    questions = [{"input": f"\nWhat is the special magic number for {k} mentioned in the provided text? "
                           f"The special magic number for {k} mentioned in the provided text is", "answers": [v]}
                 for k, v in zip(keys, values)]
    return KJV_MULTI, placed, questions, None, "kjv"


TASKS = {
    "passkey": _passkey,
    "number_string": _number_string,
    "kv_retrieval": None,  # TaskMaker._kv: the haystack is the JSON object itself
    "niah_single": lambda rng, d: _niah(rng, d),
    "niah_multikey": lambda rng, d: _niah(rng, d, distractors=3),
    "niah_multivalue": lambda rng, d: _niah(rng, d, values=4),
    "niah_multiquery": lambda rng, d: _niah(rng, d, queries=4),
    "vt": _vt,
    "kjv_niah": lambda rng, d: _niah(rng, d, haystack="kjv"),
    "kjv_multi": _kjv_multi,
}
MAX_NEW_TOKENS = {"passkey": 6, "number_string": 12, "kv_retrieval": 50, "niah_single": 12, "niah_multikey": 12,
                  "niah_multivalue": 48, "niah_multiquery": 48, "vt": 30, "kjv_niah": 12,
                  "kjv_multi": 12}


class TaskMaker:
    """make(task, length, i, n) -> one example; filler and its token counts are prepared once per tokenizer."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tok, self.seed, self._hay = tokenizer, seed, {}

    def haystack(self, kind: str) -> Haystack:
        if kind not in self._hay:
            units = [NOISE] if kind == "noise" else [ln + "\n" for ln in kjv_text().split("\n") if ln.strip()]
            self._hay[kind] = Haystack(self.tok, units)
        return self._hay[kind]

    def ntok(self, text: str) -> int:
        return len(self.tok.encode(text))

    def make(self, task: str, length: int, i: int = 0, n: int = 1) -> dict:
        return self.make_at(task, length, i, 0.5 if n == 1 else i / (n - 1))

    def make_at(self, task: str, length: int, i: int, depth: float) -> dict:
        """Example i of (task, length) with its needle at `depth`: what make(task, length, i, n) gives for the n
        whose depth that is (a record's task, target_length, i and depth regenerate its example)."""
        if task not in TASKS:
            raise TaskError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        if length < 256:
            raise TaskError(f"length must be at least 256 tokens, got {length}")
        rng = random.Random(f"{self.seed}/{task}/{length}/{i}")
        if task == "kv_retrieval":
            return self._kv(rng, length, depth)
        instruction, needles, question, answers, kind = TASKS[task](rng, depth)
        questions = None
        if isinstance(question, list):  # several questions about one context: budget for the longest
            questions = [{**q, "input": "\n" + q["input"].strip()} for q in question]
            question, answers = max((q["input"] for q in questions), key=self.ntok), questions[0]["answers"]
        hay = self.haystack(kind)
        question = "\n" + question.strip()
        budget = length - self.ntok(instruction) - self.ntok(question) - sum(self.ntok(s) for _, s in needles)
        start = rng.randrange(len(hay.units)) if kind == "kjv" else 0
        for _ in range(3):  # the joined text can take a few more tokens than its lines apart: measure, shrink
            context, offsets = hay.build(max(budget, 1), needles, start)
            total = self.ntok(instruction + context + question)
            if total <= length:
                break
            budget -= total - length
        ex = {"dataset": task, "instruction": instruction, "context": context, "input": question, "answers": answers,
              "length": total, "depth": depth, "needles": offsets, "all_classes": None}
        if questions:
            ex.update(input=questions[0]["input"], questions=questions)
        return ex

    def _kv(self, rng, length, depth):
        pair = lambda k, v: f"{json.dumps(k)}: {json.dumps(v)}"  # noqa: E731
        pool = [(_uuid(rng), _uuid(rng)) for _ in range(16)]
        pair_tokens = self.ntok(", ".join(pair(k, v) for k, v in pool)) / 16  # UUIDs tokenize unevenly
        total, n_pairs = 0, max(2, int(length / pair_tokens))
        for step in range(8):  # size, measure, resize; then drop pairs until the total is within the target
            if step >= 2 and total <= length:
                break
            while len(pool) < n_pairs:
                pool.append((_uuid(rng), _uuid(rng)))
            pairs = pool[:n_pairs]
            target = min(n_pairs - 1, round(depth * (n_pairs - 1)))
            context = "{" + ", ".join(pair(k, v) for k, v in pairs) + "}"
            question = f"\n\nKey: \"{pairs[target][0]}\"\nThe value associated with the specified key is:"
            total = self.ntok(KV + context + question)
            n_pairs = max(2, n_pairs + int((length - total) / pair_tokens) if step < 1 else n_pairs - 1)
        offset = 1 + sum(len(pair(k, v) + ", ") for k, v in pairs[:target])
        return {"dataset": "kv_retrieval", "instruction": KV, "context": context, "input": question, "answers": [pairs[target][1]],
                "length": total, "depth": depth, "needles": [offset], "all_classes": None}


def write_jsonl(path: str, examples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
