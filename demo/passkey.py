"""The passkey task of the built-in demo: a number hidden in a long haystack of filler text, and a question.

    context:  "The traveler dreams beside the house.\nA river is happy after the storm.\n ...
               An old man waits and the wind works.\nThe badge number is 56993. Remember it.\nThe wind ...
               The evening is green and golden.\n"
    question: "What is the badge number?"
    answer:   "56993"

The needle is one self-contained sentence at a chosen depth, between two filler sentences. Its NAME varies
(pass key, secret code, door number, ...) and the question asks for that same name, so how likely the
question is depends on what the context says: that is the signal ParallelComp ranks chunks by (its stage 2).
With a single fixed name, a model learns only that some question follows a needle, and chunk ranking would
rest on one token.

Token layout, for training and for generation alike: the tokenizer's own encoding of the text

    context + question + " " + answer,   then EOS        (the question starts with a space: " What is ...")

as ParallelComp feeds a prompt (tokenizer.encode_prompt: [BOS] and the whole text encoded once), so the
model's greedy continuation of the prompt `context + question` is the answer's digits, then EOS (the stop).
With this SentencePiece model that is token for token what encoding the three parts separately gives (each
with its leading-space marker), the layout the committed demo model was trained on. The filler holds no digits and none of the needle names, and every sentence ends with '.'; sentences
are grouped in short lines and paragraphs, so a chunker finds a line end in every few dozen tokens.

Pure Python (plus a tokenizer.Tokenizer, or any tokenizer with `encode`, `encode_prompt` and `stop_ids`); deterministic given the `random.Random` passed in.
"""
from __future__ import annotations

import random

# ----------------------------------------------------------------------------------------------------
# Filler: plain sentences from small word lists (no digits, no needle names)

SUBJECTS = ("the grass", "the sky", "the sun", "a river", "the wind", "an old man", "a young girl", "the baker",
            "a small dog", "the cat", "the farmer", "a tall tree", "the teacher", "a gray cloud", "the moon",
            "a little bird", "the fisherman", "a child", "a quiet village", "the market", "the sea",
            "a red fox", "the painter", "the old bridge", "a horse", "the garden", "the traveler", "the rain")
VERBS = ("walks", "rests", "waits", "sings", "shines", "moves", "sleeps", "plays", "grows", "turns", "stays",
         "wanders", "looks", "listens", "dreams", "falls", "runs", "sits", "smiles", "works")
PLACES = ("in the morning", "near the hill", "by the lake", "under the stars", "across the field",
          "in the evening", "along the road", "beside the house", "over the water", "at the edge of the forest",
          "in the town square", "behind the barn", "on the beach", "through the valley", "in the warm light",
          "after the storm", "before the winter", "for a long time", "without a sound", "once again")
ADJECTIVES = ("green", "blue", "yellow", "calm", "bright", "soft", "warm", "cold", "quiet", "gentle", "wide",
              "happy", "slow", "tired", "kind", "busy", "pale", "golden", "dark", "clear")
NOUNS = ("day", "night", "season", "song", "story", "path", "world", "garden", "window", "valley",
         "harbor", "meadow", "evening", "journey", "summer", "morning", "field", "forest")


def filler_sentence(rng: random.Random) -> str:
    """One plain sentence ending with '.', from one of a few templates."""
    kind = rng.randrange(4)
    if kind == 0:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}"
    elif kind == 1:
        s = f"{rng.choice(SUBJECTS)} is {rng.choice(ADJECTIVES)} {rng.choice(PLACES)}"
    elif kind == 2:
        s = f"the {rng.choice(NOUNS)} is {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}"
    else:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} and {rng.choice(SUBJECTS)} {rng.choice(VERBS)}"
    return s[0].upper() + s[1:] + "."


def separator(rng: random.Random) -> str:
    """What follows a sentence: another on the same line, a line end, or a paragraph end."""
    return rng.choices((" ", "\n", "\n\n"), weights=(3, 4, 1))[0]


def filler_units(rng: random.Random, n_sentences: int) -> list[str]:
    """n_sentences filler sentences, each with the separator that follows it."""
    return [filler_sentence(rng) + separator(rng) for _ in range(n_sentences)]


def make_haystack(rng: random.Random, n_sentences: int) -> str:
    """Filler text of n_sentences sentences in lines and paragraphs, ending with a line end."""
    return "".join(filler_units(rng, n_sentences)).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------
# Needle, question, answer

NAMES = ("pass key", "secret code", "door number", "vault pin", "access code", "locker number",
         "safe combination", "ticket number", "badge number", "room number", "lucky number", "magic number",
         "serial number", "order number", "station code", "launch code")


def make_needle(rng: random.Random) -> tuple[str, str, str]:
    """(needle sentence, question, answer) for a random name and a random 5-digit key."""
    name, key = rng.choice(NAMES), str(rng.randint(10000, 99999))
    return f"The {name} is {key}. Remember it.", f" What is the {name}?", key


def example_ids(tokenizer, context: str, question: str, answer: str | None = None) -> list[int]:
    """The prompt context + question as ParallelComp encodes it (tokenizer.encode_prompt), or with an answer the
    training sequence: the text context + question + " " + answer encoded the same way, then EOS.

    Without an answer this is the prompt whose greedy continuation is the answer's digits, then EOS."""
    p = tokenizer.encode_prompt(context, question if answer is None else f"{question} {answer}")
    ids = p.header + p.context + p.question
    return ids if answer is None else ids + [eos_id(tokenizer)]


def eos_id(tokenizer) -> int:
    """The EOS the demo model is trained to emit after the answer (the tokenizer's first stop id)."""
    return tokenizer.stop_ids[0]


ENDINGS = ("\n", "\n\n", "")


def make_example(rng: random.Random, tokenizer, n_tokens: int, depth: float | None = None,
                 ending: str | None = "\n") -> tuple[str, str, str]:
    """(context, question, answer) whose full training sequence `example_ids(context, question, answer)`
    is at most n_tokens long and within one filler sentence of it.

    depth: where the needle sits in the context, 0.0 (first sentence) to 1.0 (last); random when None.
    ending: what follows the context's last '.': a line end (the task's format), or when None one of
    ENDINGS at random. Training on all three teaches the model that the question may follow any sentence,
    line or paragraph end, which is where ParallelComp cuts its chunks.
    Token counts are measured with `tokenizer`, not estimated."""
    needle, question, answer = make_needle(rng)
    depth = rng.random() if depth is None else depth
    ending = rng.choice(ENDINGS) if ending is None else ending
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    fixed = 2 + len(tokenizer.encode(question.lstrip())) + len(tokenizer.encode(answer))  # BOS, EOS, question, answer
    needle += separator(rng)
    before: list[str] = []
    after: list[str] = []

    def context() -> str:
        return "".join(before + [needle] + after).rstrip() + ending

    # grow: fill the exact deficit with filler sentences (their lengths encoded one by one are an estimate,
    # so a second round tops up what the first one missed), split around the needle by depth
    while (deficit := n_tokens - fixed - len(tokenizer.encode(context()))) > 0:
        new, used = [], 0
        while used + (cost := len(tokenizer.encode(unit := filler_sentence(rng) + separator(rng)))) <= deficit:
            new.append(unit)
            used += cost
        if not new:
            break
        cut = round(depth * len(new))
        before, after = before + new[:cut], after + new[cut:]
    # trim: drop filler sentences (from the end, or from the start once the needle is last) until it fits:
    # about the excess at once, by their lengths encoded one by one, then one exact count per round (one
    # sentence and one full encode at a time took minutes at 1M tokens)
    while (excess := len(tokenizer.encode(context())) + fixed - n_tokens) > 0:
        while excess > 0:
            if not before and not after:
                raise ValueError(f"n_tokens={n_tokens} is too small for a passkey example")
            excess -= len(tokenizer.encode((after or before).pop(-1 if after else 0)))
    return context(), question, answer
