"""The official scorers of LongBench (Bai et al., 2023), InfiniteBench (Zhang et al., 2024) and RULER (Hsieh et
al., 2024), re-implemented from their definitions. Each scorer takes (prediction, ground_truth) strings and
returns a float in [0, 1]; `score_example` takes the max over an example's ground truths as LongBench does.

ROUGE-L is the `rouge` package's F score (what LongBench calls); the code edit similarity is fuzzywuzzy's
`fuzz.ratio` as LongBench's requirements.txt gets it (no python-Levenshtein: difflib's SequenceMatcher), written
out on the standard library. InfiniteBench scores passkey, number_string, kv_retrieval and longdialogue_qa_eng
against the first label only, as its compute_scores.py does. The Chinese datasets (multifieldqa_zh, dureader, vcsum, lsht,
passage_retrieval_zh) need the jieba segmenter and are not supported.
"""
from __future__ import annotations

import re
import string
from collections import Counter

# ----------------------------------------------------------------------------------------------------
# LongBench


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles (a/an/the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: list[str], ground_truth: list[str]) -> float:
    """Bag-of-tokens F1 (the overlap counts each token at most as often as it occurs in both)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truth: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def rouge_l(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F of the `rouge` package; 0 where it refuses the input (an empty or punctuation-only string)."""
    from rouge import Rouge
    try:
        return float(Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):
        return 0.0


def classification(prediction: str, ground_truth: str, all_classes: list[str] | None = None, **_) -> float:
    """1/m if the true class is among the m class names found in the prediction, after dropping any found name
    that is a proper substring of the true class (so "location" does not count against "other location")."""
    found = [c for c in (all_classes or []) if c in prediction]
    found = [c for c in found if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(found) if ground_truth in found else 0.0


def _share_of_numbers(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, ground_truth: str, **_) -> float:
    """passage_retrieval_en: the share of the numbers in the prediction that equal the true paragraph number."""
    match = re.search(r"Paragraph (\d+)", ground_truth)
    return _share_of_numbers(prediction, match.group(1)) if match else 0.0


def count(prediction: str, ground_truth: str, **_) -> float:
    """passage_count: the share of the numbers in the prediction that equal the true count."""
    return _share_of_numbers(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's fuzz.ratio as LongBench's requirements.txt installs it (fuzzywuzzy without python-Levenshtein):
    100 for equal strings, 0 when either is empty, else round(100 * difflib.SequenceMatcher(None, a, b).ratio()),
    with difflib's default autojunk. (rapidfuzz's ratio is an indel-distance ratio: it differs on many pairs.)"""
    from difflib import SequenceMatcher
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, ground_truth: str, **_) -> float:
    """lcc, repobench-p: edit similarity of the first generated line that is not a comment or a code fence."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, ground_truth) / 100


# ----------------------------------------------------------------------------------------------------
# InfiniteBench


def first_int(prediction: str) -> str:
    """The first run of digits in the prediction, or ''."""
    match = re.search(r"\d+", prediction)
    return match.group(0) if match else ""


def first_int_match(prediction: str, ground_truth: str, **_) -> float:
    """passkey, number_string: the first number in the prediction is the answer."""
    return float(first_int(prediction) == str(ground_truth))


def _words(prediction: str, chars: str = "\n:\"'.,?!{}") -> list[str]:
    for c in chars:
        prediction = prediction.replace(c, " ")
    return prediction.split()


def word_match(prediction: str, ground_truth: str, **_) -> float:
    """kv_retrieval: the value is one of the prediction's words (split at spaces and punctuation)."""
    return float(str(ground_truth) in _words(prediction))


def name_match(prediction: str, ground_truth: str, **_) -> float:
    """longdialogue_qa_eng: the character's name is one of the prediction's words, upper-cased."""
    return float(str(ground_truth) in [w.upper() for w in _words(prediction.strip())])


def choice(prediction: str, ground_truth: str, letter: str | None = None, **_) -> float:
    """longbook_choice_eng: the chosen option, found as InfiniteBench
    does: a leading A-D, the option text itself, the letter after an "answer is"-style phrase, or else the
    first word that is a single letter A-D. `letter` is the true option's letter; `ground_truth` its text."""
    truths = {str(ground_truth)} | ({letter} if letter else set())
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in truths)
    if pred in truths:
        return 1.0
    pred = " ".join(_words(pred, "\n\"'.,?!{}"))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        i = pred.find(prefix)
        if i >= 0:
            rest = pred[i + len(prefix) + 1:]
            return float(any(rest.startswith(t) for t in truths))
    # InfiniteBench's `word in "ABCD"`: the first word that is a substring of "ABCD" ("A", "BC", ...) decides
    return next((float(w in truths) for w in pred.split() if w in "ABCD"), 0.0)


# ----------------------------------------------------------------------------------------------------
# RULER


def string_match_all(prediction: str, ground_truths: list[str]) -> float:
    """The share of the reference strings found in the prediction (case-insensitive): multi-value/multi-query
    needles, variable tracking."""
    pred = prediction.lower()
    return sum(str(g).lower() in pred for g in ground_truths) / len(ground_truths)


def string_match_part(prediction: str, ground_truths: list[str]) -> float:
    """1 if any reference string is in the prediction (case-insensitive): single-answer needles."""
    pred = prediction.lower()
    return float(any(str(g).lower() in pred for g in ground_truths))


# ----------------------------------------------------------------------------------------------------
# Which scorer each dataset uses

LONGBENCH_METRICS = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "hotpotqa": qa_f1, "2wikimqa": qa_f1,
    "musique": qa_f1, "triviaqa": qa_f1,
    "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "samsum": rouge_l,
    "trec": classification,
    "passage_retrieval_en": retrieval, "passage_count": count,
    "lcc": code_sim, "repobench-p": code_sim,
}
# LongBench scores only the first line of the prediction on these few-shot datasets
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")

# InfiniteBench's compute_scores.py scores these against the first label only (label[0]); the others (QA F1,
# choice) against all of them
INFINITEBENCH_FIRST_LABEL = ("passkey", "number_string", "kv_retrieval", "longdialogue_qa_eng")
INFINITEBENCH_METRICS = {
    "passkey": first_int_match, "number_string": first_int_match, "kv_retrieval": word_match,
    "longbook_qa_eng": qa_f1, "longbook_choice_eng": choice, "longdialogue_qa_eng": name_match,
}

# the locally generated tasks (eval/tasks.py): "all" scores need every reference, "any" one of them
SYNTHETIC_METRICS = {"passkey": "first_int", "passkey_bare": "first_int", "number_string": "first_int", "kv_retrieval": "any",
                     "niah_single": "any", "niah_multikey": "any", "niah_multivalue": "all",
                     "niah_multiquery": "all", "vt": "all", "kjv_niah": "any",
                     "kjv_multi": "any"}


def score_example(dataset: str, prediction: str, answers: list, all_classes: list[str] | None = None,
                  benchmark: str = "longbench", letter: str | None = None) -> float:
    """One example's score in [0, 1]: the best over its ground truths (LongBench; InfiniteBench's QA and choice),
    the first ground truth only (InfiniteBench's passkey, number_string, kv_retrieval, longdialogue_qa_eng, as its
    compute_scores.py), or the RULER string match over all of them (benchmark "synthetic")."""
    if benchmark == "synthetic":
        kind = SYNTHETIC_METRICS[dataset]
        if kind == "first_int":
            return first_int_match(prediction, answers[0])
        return (string_match_all if kind == "all" else string_match_part)(prediction, answers)
    table = LONGBENCH_METRICS if benchmark == "longbench" else INFINITEBENCH_METRICS
    if dataset not in table:
        raise KeyError(f"no {benchmark} scorer for dataset {dataset!r}; supported: {', '.join(sorted(table))}")
    if benchmark == "longbench" and dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if benchmark == "infinitebench" and dataset in INFINITEBENCH_FIRST_LABEL:
        answers = answers[:1]
    metric = table[dataset]
    return max(metric(prediction, str(g), all_classes=all_classes, letter=letter) for g in answers)
