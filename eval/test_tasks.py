"""Generated tasks: length in the model's own tokens, needles where they should be, answers recoverable from
the text, determinism by seed (the demo model's SentencePiece tokenizer; no model run)."""
import json
import os
import re
import shutil

import pytest

from eval import synthetic
from eval.metrics import score_example
from eval.run import core_version
from eval.tasks import TASKS, TaskError, TaskMaker
from tokenizer import load_tokenizer

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "model")
NOISE_TASKS = [t for t in TASKS if not t.startswith("kjv")]
needs_bible = pytest.mark.skipif(shutil.which("bible") is None,
                                 reason="bible-kjv is not installed (make eval-deps installs it)")


@pytest.fixture(scope="module")
def maker():
    return TaskMaker(load_tokenizer(DEMO), seed=0)


@pytest.mark.parametrize("task", NOISE_TASKS)
def test_length_answers_and_needle(maker, task):
    n = 3
    ntok = maker.ntok
    for length in (1024, 4096):
        for i in range(n):
            ex = maker.make(task, length, i, n)
            # filled to the budget a filler line (a noise line is 30-45 tokens here; a UUID pair about 80) at a time
            assert length - (100 if task == "kv_retrieval" else 64) <= ex["length"] <= length + 16, (task, ex["length"])
            assert ex["length"] == len(maker.tok.encode(ex["instruction"] + ex["context"] + ex["input"]))
            assert ex["instruction"] and ex["instruction"] not in ex["context"] + ex["input"]
            for a in ex["answers"]:
                assert a in ex["context"], (task, a)
            assert ex["depth"] == i / (n - 1)
            # the first needle offset points at the sentence asked about, at about its depth
            at = ex["needles"][0]
            head = ex["context"][at:at + 200]
            assert any(a in head for a in ex["answers"]) or task == "vt" and ex["answers"][0] in head
            if task != "vt":  # (the chain's first line sits at the depth too, its hops spread after it)
                before, total = ntok(ex["context"][:at]), ntok(ex["context"])
                # one filler line (one key/value pair), plus the other needles placed before it
                slack = 100 if task == "kv_retrieval" else 64 + 40 * (len(ex["needles"]) - 1)
                assert abs(before - ex["depth"] * total) <= slack, (task, before, total, ex["depth"])
            # the reference answer scores 1, a wrong one 0
            assert score_example(task, " " + ", ".join(ex["answers"]), ex["answers"], benchmark="synthetic") == 1.0
            assert score_example(task, " 0", ex["answers"], benchmark="synthetic") == 0.0


def test_multikey_has_distractors_and_multiquery_asks_all(maker):
    ex = maker.make("niah_multikey", 2048, 0, 1)
    keys = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is", ex["context"])
    assert len(set(keys)) == 4 and ex["input"].count(keys[0]) + sum(ex["input"].count(k) for k in keys[1:]) == 2
    ex = maker.make("niah_multiquery", 2048, 0, 1)
    assert len(ex["answers"]) == 4 and all(
        re.search(rf"for [a-z]+-[a-z]+ is: {a}\.", ex["context"]) for a in ex["answers"])


def test_vt_chain_is_in_order(maker):
    ex = maker.make("vt", 2048, 0, 1)
    names = ex["answers"]
    value = re.search(r"VAR " + names[0] + r" = (\d+)\.", ex["context"]).group(1)
    assert value in ex["input"]
    pos = [ex["context"].index(f"VAR {n} =") for n in names]
    assert pos == sorted(pos)
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}." in ex["context"]


def test_same_seed_same_examples_other_seed_other_examples():
    tok = load_tokenizer(DEMO)
    a, b, c = (TaskMaker(tok, seed=s).make("passkey", 1024, 1, 3) for s in (0, 0, 1))
    assert a == b and a["answers"] != c["answers"]


@needs_bible
def test_kjv_needle_sits_in_bible_text(maker):
    ex = maker.make("kjv_niah", 2048, 1, 3)
    assert " the " in ex["context"] and ex["answers"][0] in ex["context"] and "grass is green" not in ex["context"]


def test_unknown_task_and_tiny_length_are_refused(maker):
    with pytest.raises(TaskError, match="unknown task"):
        maker.make("nope", 1024)
    with pytest.raises(TaskError, match="at least 256"):
        maker.make("passkey", 100)


def test_write_mode_emits_longbench_schema_files(tmp_path, capsys):
    out = tmp_path / "tasks"
    assert synthetic.main(["--ckpt", DEMO, "--write", str(out), "--tasks", "passkey,vt", "--lengths", "1k",
                           "--n", "2"]) == 0
    rows = [json.loads(line) for line in open(out / "passkey_1024.jsonl")]
    assert len(rows) == 2 and {"instruction", "context", "input", "answers", "dataset", "length"} <= set(rows[0])
    assert synthetic.main(["--ckpt", DEMO, "--write", str(out), "--tasks", "passkey,nope"]) == 1
    assert synthetic.main(["--ckpt", DEMO, "--write", str(out), "--lengths", "4x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown task(s) nope" in err[0] and "4x" in err[1]


@needs_bible
def test_kjv_multi_has_one_question_per_needle_at_spread_depths(maker):
    n = 3
    for i in range(n):
        ex = maker.make("kjv_multi", 2048, i, n)
        assert ex == maker.make_at("kjv_multi", 2048, i, i / (n - 1))
        qs = ex["questions"]
        assert len(qs) == len(ex["needles"]) == 4 and ex["input"] == qs[0]["input"]
        assert ex["length"] <= 2048 and "grass is green" not in ex["context"]
        keys = [re.search(r"number for ([a-z]+-[a-z]+) mentioned", q["input"]).group(1) for q in qs]
        assert len(set(keys)) == 4
        total = maker.ntok(ex["context"])
        for j, (q, at, key) in enumerate(zip(qs, ex["needles"], keys)):
            # needle j says key j's value, at depth (j + depth) / 4 of the context, one Bible verse either way
            assert ex["context"][at:].startswith(f"One of the special magic numbers for {key} is: {q['answers'][0]}.")
            assert abs(maker.ntok(ex["context"][:at]) - (j + ex["depth"]) / 4 * total) <= 120 + 40 * j
            assert score_example("kjv_multi", " " + q["answers"][0], q["answers"], benchmark="synthetic") == 1.0
            assert score_example("kjv_multi", " " + qs[(j + 1) % 4]["answers"][0], q["answers"],
                                 benchmark="synthetic") == 0.0


@needs_bible
def test_kjv_multi_runs_every_question_records_hashes_and_resumes(tmp_path):
    out = str(tmp_path / "r.jsonl")
    argv = ["--ckpt", DEMO, "--tasks", "kjv_multi", "--lengths", "1k", "--n", "1", "--chunk-size", "100",
            "--setting", "t", "--out", out]
    assert synthetic.main(argv) == 0
    recs = synthetic.read_records(out)
    maker = TaskMaker(load_tokenizer(DEMO), seed=0)
    ex = maker.make("kjv_multi", 1024, 0, 1)
    assert [r["q"] for r in recs] == [0, 1, 2, 3]
    assert [r["answers"] for r in recs] == [q["answers"] for q in ex["questions"]]
    assert [r["prompt_sha256"] for r in recs] == [synthetic.prompt_sha256(ex, q["input"]) for q in ex["questions"]]
    assert len(set(r["prompt_sha256"] for r in recs)) == 4 and all(r["timing"] == "shared CPU" for r in recs)
    assert recs[0]["core"] == core_version() != "unknown"
    assert {r["needle_chunk"] for r in recs} != {recs[0]["needle_chunk"]}  # the needles lie in different chunks
    assert synthetic.main(argv) == 0 and synthetic.read_records(out) == recs  # resumed: nothing re-run
    # records from before the hash: backfilled from the regenerated examples, exactly
    with open(out, "w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "prompt_sha256"}) + "\n" for r in recs)
    assert synthetic.main(["--ckpt", DEMO, "--tasks", "kjv_multi", "--out", out, "--backfill-hash"]) == 0
    assert synthetic.read_records(out) == recs


@needs_bible
def test_kjv_multi_in_a_session_answers_as_one_shot_runs_and_resumes_mid_example(tmp_path):
    """--session encodes the context once and answers each question over it: the same predictions, chunk scores and
    needle reports as one-shot runs; a run stopped after two questions resumes with the other two."""
    base = ["--ckpt", DEMO, "--tasks", "kjv_multi", "--lengths", "1k", "--n", "1", "--chunk-size", "100"]
    one_shot, session = str(tmp_path / "one.jsonl"), str(tmp_path / "session.jsonl")
    assert synthetic.main(base + ["--setting", "t", "--out", one_shot]) == 0
    assert synthetic.main(base + ["--setting", "t", "--out", session, "--session"]) == 0
    a, b = synthetic.read_records(one_shot), synthetic.read_records(session)
    same = ("pred", "score", "q", "prompt_sha256", "needle_chunk", "needle_rank", "needle_kept", "chunk_scores")
    assert [{k: r[k] for k in same} for r in a] == [{k: r[k] for k in same} for r in b]
    assert all(r["session"] and r["encode_s"] == b[0]["encode_s"] > 0 for r in b) and "session" not in a[0]
    with open(session, "w") as f:  # stopped after two questions
        f.writelines(json.dumps(r) + "\n" for r in b[:2])
    assert synthetic.main(base + ["--setting", "t", "--out", session, "--session"]) == 0
    resumed = synthetic.read_records(session)
    assert [r["q"] for r in resumed] == [0, 1, 2, 3] and [r["pred"] for r in resumed] == [r["pred"] for r in b]


def test_examples_runs_only_those_indices_at_the_depths_of_n(tmp_path):
    out = str(tmp_path / "r.jsonl")
    base = ["--ckpt", DEMO, "--tasks", "passkey", "--lengths", "600", "--n", "4", "--chunk-size", "200",
            "--setting", "t", "--out", out]
    assert synthetic.main(base + ["--examples", "3,1"]) == 0
    recs = synthetic.read_records(out)
    assert [(r["i"], r["depth"]) for r in recs] == [(1, 1 / 3), (3, 1.0)]
    for bad in ("4", "-1", "a", ""):
        assert synthetic.main(base + ["--examples", bad]) == 1
