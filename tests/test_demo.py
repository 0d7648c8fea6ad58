"""The committed demo model (demo/model, trained by demo/train.py at a 256-token window) retrieves its passkey
at 16x that window with ParallelComp; and the demo command runs end to end."""
import random

from demo.passkey import make_example
from demo.run import MODEL_DIR, run_demo
from model import load_model
import parallelcomp as pc
from parallelcomp import ParallelCompConfig
from tokenizer import load_tokenizer


def test_demo_model_retrieves_passkey_at_16x_its_window():
    model, tok = load_model(MODEL_DIR), load_tokenizer(MODEL_DIR)
    n_tokens = 16 * model.args.trained_window
    for seed in range(5):
        rng = random.Random(seed)
        context, question, answer = make_example(rng, tok, n_tokens, depth=rng.random())
        result = pc.answer(model, tok, context, question, ParallelCompConfig(keep_chunks=1), max_new_tokens=8)
        assert result.text.strip() == answer, (seed, result.text, answer)
        assert result.stats["chunks_total"] >= 16


def test_demo_command_runs(capsys):
    assert run_demo(length=2048, full_length=512, seed=7) == 0
    out = capsys.readouterr().out
    assert "parallelcomp over   2,048 tokens" in out and "full over     512 tokens" in out
    pc_line = next(line for line in out.splitlines() if "parallelcomp over" in line)
    assert " correct " in pc_line  # 8x the window: the needle chunk is found and read


def test_demo_layout_is_what_the_committed_model_was_trained_on():
    """The demo's prompt text (the question starts with a space) encoded once as ParallelComp encodes it gives,
    token for token, the layout demo/model was trained on: [BOS] + context, question and answer each encoded
    on its own (each with SentencePiece's leading-space marker) + EOS."""
    from demo.passkey import example_ids
    tok = load_tokenizer(MODEL_DIR)
    for seed in range(40):
        context, question, answer = make_example(random.Random(seed), tok, 300, ending=None)
        separate = [tok.bos_id] + tok.encode(context) + tok.encode(question.lstrip()) + tok.encode(answer)
        assert example_ids(tok, context, question, answer) == separate + [tok.stop_ids[0]], seed
        assert example_ids(tok, context, question) == separate[:len(separate) - len(tok.encode(answer))], seed

