"""The LongBench/InfiniteBench-format runner on small synthetic files in the official schemas: prompt split,
scoring, prediction files, errors. A fake model answers where the score must be exact; a tiny random
checkpoint runs the real pipeline end to end (seconds)."""
import json
import os

import pytest

from eval import prompts, run
import parallelcomp
from parallelcomp import Result


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def longbench_row(dataset, context, question, answers, all_classes=None):
    return {"input": question, "context": context, "answers": answers, "length": len(context.split()),
            "dataset": dataset, "language": "en", "all_classes": all_classes, "_id": "x"}


@pytest.mark.parametrize("bench", ["longbench", "infinitebench"])
def test_split_prompt_rejoins_to_the_official_prompt(bench):
    table = prompts.LONGBENCH if bench == "longbench" else prompts.INFINITEBENCH
    fields = {"context": "CTX {not a field}", "input": "QUESTION",
              **{f"OPTION_{c}": f"opt {c}" for c in "ABCD"}}
    for dataset, (template, max_new) in table.items():
        instruction, context, question = prompts.split_prompt(template, fields)
        assert instruction + context + question == template.format(**fields), dataset
        assert context == "CTX {not a field}" and "CTX" not in instruction + question, dataset
        assert max_new > 0
        if "{input}" in template:
            assert "QUESTION" in question, dataset


def test_split_prompt_errors_name_the_missing_field():
    with pytest.raises(prompts.PromptError, match="OPTION_A"):
        prompts.split_prompt(prompts.INFINITEBENCH["longbook_choice_eng"][0], {"context": "c", "input": "q"})


class FakeModel:
    """Stands in for parallelcomp.answer: records what it was given, answers from a script."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, model, tok, context, question, cfg, method, max_new_tokens, full_max_tokens=None,
                 chat=False, trace=False, instruction=""):
        self.calls.append(dict(instruction=instruction, context=context, question=question, method=method,
                               max_new_tokens=max_new_tokens, chat=chat))
        return Result([], self.replies.pop(0), {"input_tokens": 10})


@pytest.fixture
def fake(monkeypatch, tiny_ckpt):
    ckpt = tiny_ckpt()

    def install(replies):
        f = FakeModel(replies)
        monkeypatch.setattr(parallelcomp, "answer", f)
        return ckpt, f
    return install


def test_longbench_files_are_scored_with_the_official_metrics(fake, tmp_path):
    ckpt, f = fake(["Paris", "the cat on mat", "Paragraph 2", "location"])
    qa = write(tmp_path / "hotpotqa.jsonl", [longbench_row("hotpotqa", "P1. P2.", "Capital of France?", ["Paris"]),
                                             longbench_row("hotpotqa", "P3.", "Where?", ["a cat sat on a mat"])])
    ret = write(tmp_path / "pr.jsonl", [longbench_row("passage_retrieval_en", "Paragraph 1: a", "abs", ["Paragraph 1"])])
    trec = write(tmp_path / "trec.jsonl", [longbench_row("trec", "q1\nType: person", "q2\nType:", ["location"],
                                                         ["person", "location", "other location"])])
    out = str(tmp_path / "out")
    assert run.main(["--ckpt", ckpt, "--benchmark", "longbench", "--data", qa, ret, trec, "--out", out,
                     "--chat"]) == 0
    result = json.load(open(os.path.join(out, "result.json")))
    # hotpotqa: 1.0 and F1("cat on mat", "cat sat on mat") = 2 * 1 * 0.75 / 1.75 = 6/7 -> mean 0.92857
    assert result == {"hotpotqa": 92.86, "passage_retrieval_en": 0.0, "trec": 100.0}
    first = f.calls[0]
    template = prompts.LONGBENCH["hotpotqa"][0]
    assert first["instruction"] + first["context"] + first["question"] == template.format(
        context="P1. P2.", input="Capital of France?")
    assert first["context"] == "P1. P2." and first["instruction"].startswith("Answer the question based on")
    assert first["question"].endswith("Question: Capital of France?\nAnswer:") and first["max_new_tokens"] == 32
    assert first["chat"] is True and f.calls[3]["chat"] is False  # LongBench uses no chat template on trec
    rows = [json.loads(line) for line in open(os.path.join(out, "hotpotqa.jsonl"))]
    assert [r["pred"] for r in rows] == ["Paris", "the cat on mat"] and rows[0]["answers"] == ["Paris"]
    # rescoring the files gives the same table
    assert run.main(["--score", out]) == 0
    assert json.load(open(os.path.join(out, "result.json"))) == result


def test_infinitebench_files_take_the_dataset_from_the_file_name(fake, tmp_path):
    ckpt, f = fake([" 12345.", " 999", "B", "C. no"])
    pk = write(tmp_path / "passkey.jsonl", [{"id": 0, "context": "noise", "input": "What is the pass key?",
                                             "answer": "12345", "options": []},
                                            {"id": 1, "context": "noise", "input": "What is the pass key?",
                                             "answer": ["54321"], "options": []}])
    mc = write(tmp_path / "longbook_choice_eng.jsonl", [
        {"id": 0, "context": "book", "input": "Who?", "answer": ["Bob"], "options": ["Al", "Bob", "Cy", "Di"]},
        {"id": 1, "context": "book", "input": "Who?", "answer": ["Bob"], "options": ["Al", "Bob", "Cy", "Di"]}])
    out = str(tmp_path / "out")
    assert run.main(["--ckpt", ckpt, "--benchmark", "infinitebench", "--data", pk, mc, "--out", out,
                     "--keep-chunks", "1"]) == 0
    assert json.load(open(os.path.join(out, "result.json"))) == {"longbook_choice_eng": 50.0, "passkey": 50.0}
    assert f.calls[0]["question"] == "\n\nWhat is the pass key?\n\nThe pass key is"
    assert f.calls[0]["instruction"].startswith("There is an important info") and f.calls[0]["context"] == "noise"
    assert f.calls[2]["question"].startswith("\n\nQuestion: Who?\nA. Al\nB. Bob\n")


def test_the_real_pipeline_runs_end_to_end_on_a_tiny_checkpoint(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt(max_position_embeddings=256)  # the template's instruction and question: ~120 tokens here
    rows = [longbench_row("multifieldqa_en", "The grass is green. " * 40, "What colour is the grass?", ["green"])]
    data = write(tmp_path / "mf.jsonl", rows)
    for method in ("parallelcomp", "full"):
        out = str(tmp_path / method)
        assert run.main(["--ckpt", ckpt, "--data", data, "--out", out, "--method", method, "--chunk-size", "40",
                         "--full-max-tokens", "240"]) == 0
        rec = json.loads(open(os.path.join(out, "multifieldqa_en.jsonl")).readline())
        assert isinstance(rec["pred"], str) and 0.0 <= rec["score"] <= 1.0 and rec["method"] == method
        if method == "parallelcomp":
            assert rec["chunks_total"] > 1 and rec["chunks_kept"] == 3


@pytest.mark.parametrize("rows, message", [
    (None, "does not exist"),
    ("not json\n", "is not JSON"),
    ([{"context": "c", "input": "q", "answers": ["a"], "dataset": "dureader"}], "no longbench template"),
    ([{"context": "c", "input": "q", "answers": ["a"]}], "no 'dataset' field"),
    ([{"context": "c", "input": "q", "answers": [], "dataset": "hotpotqa"}], "no ground-truth answers"),
])
def test_bad_input_is_one_line_and_exit_1(tiny_ckpt, tmp_path, capsys, rows, message):
    path = tmp_path / "in.jsonl"
    if isinstance(rows, str):
        path.write_text(rows)
    elif rows is not None:
        write(path, rows)
    ckpt = tiny_ckpt()
    capsys.readouterr()  # the checkpoint writer's progress bar
    assert run.main(["--ckpt", ckpt, "--data", str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
