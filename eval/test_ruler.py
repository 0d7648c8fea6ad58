"""eval/ruler.py: RULER's prompt split, its string-match score, the Wilson interval, and (where `make ruler-deps` has
built the RULER venv) parity with the package's own scorer and constants, its Punkt model, and one generated task."""
import glob
import importlib.util
import json
import os
import subprocess

import pytest

from eval import ruler
from eval.report import wilson

VENV = ruler.RULER_VENV
HAVE_VENV = os.path.exists(os.path.join(VENV, "bin", "python"))
needs_venv = pytest.mark.skipif(not HAVE_VENV, reason="RULER venv absent (make ruler-deps)")
SMOLLM2 = "eval/cache/SmolLM2-135M-Instruct"

# prompts in RULER's form (the package's templates, base model template, answer prefix appended)
NIAH = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
        "about the number afterwards.\n",
        "The grass is green. One of the special magic numbers for sour-tree is: 1234567. The sky is blue.",
        "\nWhat is the special magic number for sour-tree mentioned in the provided text? The special magic number "
        "for sour-tree mentioned in the provided text is")
VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\nThe grass. VAR AB = "
      "1\nQuestion: Find all variables that are assigned the value 1 in the text above. Answer: ... they are:  AB\n"
      "\n\n\nMemorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
      "The grass is green. VAR XYZAB = 12345 The sky is blue. VAR QWERT = VAR XYZAB \n",
      "\nQuestion: Find all variables that are assigned the value 12345 in the text above. Answer: According to "
      "the chain(s) of variable assignment in the text above, 2 variables are assgined the value 12345, they are: ")
QA = ("Answer the question based on the given documents. Only give me the answer and do not output any other words."
      "\n\nThe following are given documents.\n\n",
      "Document 1:\nParis is in France.\n\nDocument 2:\nRome is in Italy.",
      "\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other "
      "words.\n\nQuestion: Where is Paris? Answer:")


@pytest.mark.parametrize("task,parts", [("niah_single_1", NIAH), ("niah_multiquery", NIAH), ("vt", VT),
                                        ("qa_2", QA)])
def test_split_gives_instruction_context_question(task, parts):
    assert ruler.split_ruler(task, "".join(parts)) == parts


def test_split_refuses_a_prompt_without_the_markers():
    with pytest.raises(ruler.RulerError, match="markers"):
        ruler.split_ruler("qa_1", "Question: where? Answer:")


def test_score_is_rulers_string_match():
    # niah: all references, case-insensitive substring, after RULER's postprocess (control chars -> newline)
    assert ruler.score("niah_multivalue", " 111, 222\x01and 333.", ["111", "222", "333", "444"]) == 0.75
    assert ruler.score("cwe", "1. Apple 2. pear", ["apple", "pear"]) == 1.0
    # qa: any reference
    assert ruler.score("qa_1", " france", ["Paris", "France"]) == 1.0
    assert ruler.score("qa_1", " Spain", ["Paris", "France"]) == 0.0
    assert ruler.postprocess("  a\tb\x00 ") == "a\nb"


def test_keep_chunks_follows_the_number_of_answers():
    assert [t for t in ruler.TASKS if ruler.keep_chunks(t) == 3] == [
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
    assert len(ruler.TASKS) == 13


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 5)
    assert lo == pytest.approx(0.5655, abs=1e-4) and hi == 1
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))


def package_file(rel: str) -> str:
    hits = glob.glob(os.path.join(VENV, "lib", "python*", "site-packages", "long_context_eval", rel))
    assert hits, rel
    return hits[0]


def load(path: str):
    spec = importlib.util.spec_from_file_location("ruler_constants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_venv
def test_scorer_and_constants_equal_the_packages():
    official = load(package_file("eval/synthetic/constants.py"))
    gen = load(package_file("data/synthetic/constants.py"))
    for family, metric in ruler.METRIC.items():
        fn = official.TASKS[family]["metric_fn_per_sample"]
        assert fn.__name__ == f"string_match_{metric}_per_sample", family
        assert gen.TASKS[family]["tokens_to_generate"] == ruler.MAX_NEW_TOKENS[family], family
    cases = [("111 222", ["111", "333"]), ("The answer: FRANCE.", ["france"]), ("", ["x"]), ("a b c", ["A", "b"])]
    for family in ruler.METRIC:
        task = next(t for t, f in ruler.TASK_FAMILY.items() if f == family)
        fn = official.TASKS[family]["metric_fn_per_sample"]
        for pred, refs in cases:
            assert ruler.score(task, pred, refs) * 100 == fn([pred], [refs])[0], (family, pred)


@needs_venv
def test_punkt_tab_written_from_the_packaged_model_splits_as_that_model(tmp_path):
    py = os.path.join(VENV, "bin", "python")
    subprocess.run([py, "-m", "eval.ruler", "punkt", str(tmp_path)], check=True, capture_output=True)
    text = "Mr. Smith paid $5 at 3 p.m. on Jan. 3. He left. Dr. Who? Yes. U.S. law e.g. applies."
    code = ("import json, sys, nltk, punkt\n"
            "from nltk.tokenize import sent_tokenize\n"
            "t = sys.argv[1]\n"
            "print(json.dumps([sent_tokenize(t), punkt.PunktSentenceTokenizer(punkt.load_model('english')).tokenize(t)]))")
    out = subprocess.run([py, "-c", code, text], env={**os.environ, "NLTK_DATA": str(tmp_path)},
                         capture_output=True, text=True, check=True)
    nltk_sents, punkt_sents = json.loads(out.stdout)
    assert nltk_sents == punkt_sents
    assert nltk_sents[0].startswith("Mr. Smith")  # the abbreviation list is in use: no cut after "Mr."


@needs_venv
@pytest.mark.skipif(not os.path.exists(SMOLLM2), reason="SmolLM2 checkpoint absent (make model)")
def test_generate_one_task_with_the_package(tmp_path):
    ruler.generate(SMOLLM2, [1024], ["niah_single_1"], 2, str(tmp_path))
    exs = ruler.read_examples(str(tmp_path), 1024, "niah_single_1")
    assert len(exs) == 2
    from tokenizer import load_tokenizer
    tok = load_tokenizer(SMOLLM2)
    for ex in exs:
        ins, ctx, q = ruler.split_ruler("niah_single_1", ex["input"])
        assert ex["outputs"][0] in ctx and ex["outputs"][0] not in ins + q
        assert len(tok.encode(ex["input"])) + 128 <= 1024


DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "model")


def test_run_records_hashes_resumes_and_refuses_changed_data(tmp_path, monkeypatch):
    # one example per task in RULER's file format, run with the demo model (chunks it can read)
    monkeypatch.setitem(ruler.SETTINGS, "pc24", {"method": "parallelcomp", "chunk_size": 24})
    for family in ("niah", "qa"):  # the demo model's window is 256 tokens
        monkeypatch.setitem(ruler.MAX_NEW_TOKENS, family, 6)
    data, out = tmp_path / "data", str(tmp_path / "r.jsonl")
    for task, parts in (("niah_single_1", NIAH), ("qa_1", QA)):
        d = data / "200" / task
        d.mkdir(parents=True)
        ctx = parts[1]
        (d / "validation.jsonl").write_text(json.dumps(
            {"index": 0, "input": parts[0] + ctx + parts[2], "outputs": ["1234567"], "length": 199}) + "\n")
    argv = ["run", "--ckpt", DEMO, "--data", str(data), "--cells", "pc24:200,full:200", "--tasks",
            "niah_single_1,qa_1", "--n", "1", "--out", out]
    assert ruler.main(argv) == 0
    recs = [json.loads(line) for line in open(out)]
    assert [(r["task"], r["setting"]) for r in recs] == [("niah_single_1", "pc24"), ("niah_single_1", "full"),
                                                          ("qa_1", "pc24"), ("qa_1", "full")]
    inputs = {t: json.loads(open(data / "200" / t / "validation.jsonl").readline())["input"]
              for t in ("niah_single_1", "qa_1")}
    assert all(r["prompt_sha256"] == ruler.prompt_hash(inputs[r["task"]]) for r in recs)
    assert [r["keep_chunks"] for r in recs] == [1, None, 1, None] and recs[0]["chunks_total"] > 1
    assert all(r["score"] == ruler.score(r["task"], r["pred"], ["1234567"]) for r in recs)
    assert ruler.main(argv) == 0 and [json.loads(line) for line in open(out)] == recs  # resumed
    (data / "200" / "qa_1" / "validation.jsonl").write_text(json.dumps(
        {"index": 0, "input": QA[0] + "Document 1:\nother" + QA[2], "outputs": ["x"], "length": 99}) + "\n")
    assert ruler.main(argv) == 1  # the data changed under the results: refused


def test_report_takes_the_seconds_of_quiet_records_and_checks_the_sample():
    def rec(task, setting, length, seconds, timing="shared CPU", pred="1", i=0):
        return {"task": task, "setting": setting, "target_length": length, "i": i, "score": 1.0, "pred": pred,
                "seconds": seconds, "timing": timing, "prompt_sha256": task + str(i)}
    rows = [rec(t, s, n, 100.0, i=i) for t in ("niah_single_1", "vt") for s, n in (("full", 4096), ("pc2k", 16384))
            for i in range(2)]
    sample = [{**rows[2], "seconds": 40.0, "timing": "quiet"}, {**rows[6], "seconds": 50.0, "timing": "quiet",
                                                                  "pred": "2"}]
    out = ruler.report(rows, sample)
    assert "| seconds per example | 100 s (shared CPU) | 45 s (quiet, n=2) |" in out
    assert "Timing sample: 2 reruns, 1 with the same prompt and prediction as the results'" in out
    assert "| niah_single_1 | 100 (n=2; 34-100) | 100 (n=2; 34-100) |" in out  # the sample adds no example
    assert "100 s (shared CPU) | 100 s (shared CPU) |" in ruler.report(rows)
