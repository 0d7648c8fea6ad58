"""Train the built-in demo's tiny Llama on passkey retrieval (demo/passkey.py) and save it as a Hugging Face
checkpoint folder (demo/model/) that model.load_model, tokenizer.load_tokenizer and transformers all read.

Recipe (CPU only; about 10 minutes on 2 cores shared with other work):
  1. a Llama-style SentencePiece tokenizer (512 pieces: BPE, byte fallback, digits split, identity
     normalization, no whitespace folding), trained on generated filler, needles and questions;
  2. our own model.Transformer (4 layers, hidden 128, 4 query heads, 2 KV heads, 0.87M parameters) with the
     full language-model loss on [BOS] + context + question + answer + EOS, plus extra weight on the question
     and the answer; the needle at a random depth, the context ending at a random sentence, line or
     paragraph end (where ParallelComp cuts chunks); sequences of 64..128 tokens first, then 128..256
     (256 = the training window, max_position_embeddings);
  3. the checkpoint folder, read back with model.load_model, and its greedy accuracy on held-out examples
     at the training window.

Seeded: the same seed and thread count give the same model.
    .venv/bin/python demo/train.py            # writes demo/model/
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on a shared CPU

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from demo.passkey import NAMES, example_ids, make_example, make_haystack, make_needle  # noqa: E402
from model import KVCache, ModelArgs, Transformer, hf_name_map, load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


# ----------------------------------------------------------------------------------------------------
# Tokenizer

def train_tokenizer(out_dir: str, vocab_size: int, seed: int) -> None:
    """Write tokenizer.model and tokenizer_config.json into out_dir (Llama's SentencePiece options)."""
    import sentencepiece as spm
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:  # one sentence per line: SentencePiece reads lines
            for _ in range(3000):
                f.write(make_haystack(rng, rng.randint(1, 3)).replace("\n", " ").strip() + "\n")
                needle, question, answer = make_needle(rng)
                f.write(f"{needle}\n{question.strip()}\n{answer}\n")
        spm.SentencePieceTrainer.Train(
            input=corpus, model_prefix=os.path.join(tmp, "tokenizer"), vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, num_threads=1, minloglevel=2)
        shutil.copy(os.path.join(tmp, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 1_000_000})


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------
# Model

def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers); norms at 1."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * model.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)


def batch(rng: random.Random, tok, size: int, window: int) -> tuple[torch.Tensor, ...]:
    """`size` examples of window/2 .. window tokens, right-padded: inputs, targets (-100 = no loss), and the
    masks of the question's targets and of the answer's (digits and EOS), all [B, T]."""
    seqs, question_lens, answer_lens = [], [], []
    for _ in range(size):
        context, question, answer = make_example(rng, tok, rng.randint(window // 2, window), ending=None)
        seqs.append(example_ids(tok, context, question, answer))
        question_lens.append(len(tok.encode_prompt(context, question).question))
        answer_lens.append(len(seqs[-1]) - len(example_ids(tok, context, question)))  # digits and EOS
    t = max(map(len, seqs)) - 1
    inputs = torch.zeros(size, t, dtype=torch.long)
    targets = torch.full((size, t), -100, dtype=torch.long)
    question = torch.zeros(size, t, dtype=torch.bool)
    answer = torch.zeros(size, t, dtype=torch.bool)
    for i, ids in enumerate(seqs):
        n = len(ids) - 1  # targets of sequence i: ids[1:] at rows 0 .. n-1
        inputs[i, :n], targets[i, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        answer[i, n - answer_lens[i]:n] = True
        question[i, n - answer_lens[i] - question_lens[i]:n - answer_lens[i]] = True
    return inputs, targets, question, answer


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to peak/10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model: Transformer, tok, stages: list[tuple[int, int]], batch_size: int, lr: float, task_weight: float,
          seed: int) -> None:
    """stages: [(window, steps), ...]: each stage trains on sequences of up to `window` tokens.

    Loss: the language-model loss over every token (filler, needle, question, answer), plus `task_weight`
    times the mean loss of the question's tokens and again of the answer's. They are a few percent of all
    tokens; without the extra weight the model takes long to learn that the question's name is the
    needle's (the signal ParallelComp ranks chunks by) and to copy the digits."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    total, step, start = sum(n for _, n in stages), 0, time.time()
    model.train()
    for window, n_steps in stages:
        for _ in range(n_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup=50)
            inputs, targets, question, answer = batch(rng, tok, batch_size, window)
            positions = torch.arange(inputs.shape[1]).expand_as(inputs)
            logits = model(inputs, positions)  # (B, T, vocab)
            token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
            lm_loss = token_loss.sum() / (targets != -100).sum()
            question_loss = token_loss[question.flatten()].mean()
            answer_loss = token_loss[answer.flatten()].mean()
            loss = lm_loss + task_weight * (question_loss + answer_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0 or step == total:
                hit = (logits.argmax(-1) == targets) | ~answer  # every answer token right, teacher-forced
                print(f"step {step:4d}/{total}  window {window}  LM loss {lm_loss.item():.3f}  "
                      f"question {question_loss.item():.3f}  answer {answer_loss.item():.3f}  "
                      f"answers right (teacher-forced) {hit.all(1).float().mean().item():.0%}  "
                      f"{time.time() - start:.0f}s", flush=True)
    model.eval()


# ----------------------------------------------------------------------------------------------------
# Greedy accuracy with the plain model and KV cache

@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], stop_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding: prefill at positions 0..n-1, then one token at a time through a KVCache."""
    cache = KVCache(model.args.n_layers)
    tokens = torch.tensor([prompt])
    pos, out = 0, []
    for _ in range(max_new_tokens):
        positions = torch.arange(pos, pos + tokens.shape[1])[None]
        logits = model(tokens, positions, cache, logits_at=torch.tensor([[tokens.shape[1] - 1]]))
        pos += tokens.shape[1]
        nxt = int(logits[0, -1].argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
        tokens = torch.tensor([[nxt]])
    return out


def accuracy(model: Transformer, tok, n: int, n_tokens: int, seed: int) -> float:
    """Fraction of n held-out examples (needle at evenly spread depths) whose greedy answer is exact."""
    rng, right = random.Random(seed), 0
    for i in range(n):
        context, question, answer = make_example(rng, tok, n_tokens, depth=i / max(1, n - 1))
        out = greedy(model, example_ids(tok, context, question), tok.stop_ids, max_new_tokens=10)
        right += tok.decode(out).strip() == answer
    return right / n


# ----------------------------------------------------------------------------------------------------
# Saving a Hugging Face checkpoint folder

def save_checkpoint(model: Transformer, out_dir: str) -> None:
    """config.json, generation_config.json and model.safetensors (HF tensor names, float32)."""
    a = model.args
    write_json(os.path.join(out_dir, "config.json"), {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
        "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim, "hidden_act": "silu",
        "max_position_embeddings": a.max_position_embeddings, "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "vocab_size": a.vocab_size, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32"})
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False})
    ours = model.state_dict()
    state = {hf: ours[name].detach().float().contiguous().clone() for hf, name in hf_name_map(a).items()}
    assert len(state) == len(ours), f"{len(ours) - len(state)} parameters have no Hugging Face name"
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def main(out_dir: str, seed: int, vocab_size: int, stages: list[tuple[int, int]], batch_size: int, lr: float,
         task_weight: float, n_eval: int, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    train_tokenizer(out_dir, vocab_size, seed)
    tok = load_tokenizer(out_dir)
    window = stages[-1][0]  # the last stage's length is the training window
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=352,
                     vocab_size=tok.vocab_size, max_position_embeddings=window)
    model = Transformer(args)
    init_weights(model, seed)
    print(f"tokenizer: {tok.vocab_size} pieces; model: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(NAMES)} needle names; {threads} thread(s)", flush=True)
    train(model, tok, stages, batch_size, lr, task_weight, seed)
    train_s = time.time() - start
    save_checkpoint(model, out_dir)
    reloaded = load_model(out_dir)  # the accuracy below is the saved checkpoint's, read back like any other
    acc = accuracy(reloaded, load_tokenizer(out_dir), n_eval, window, seed + 1)
    print(f"trained in {train_s:.0f}s; held-out greedy accuracy at {window} tokens: {acc:.1%} "
          f"({n_eval} examples); saved {out_dir}", flush=True)
    return acc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo", "model"), help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed for data, tokenizer and initialization")
    p.add_argument("--vocab-size", type=int, default=512, help="SentencePiece vocabulary size")
    p.add_argument("--stages", default="128:500,256:700",
                   help="curriculum as length:steps,...; the last length is the training window")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--task-weight", type=float, default=1.0,
                   help="extra weight of the mean loss of the question's tokens, and of the answer's")
    p.add_argument("--n-eval", type=int, default=500, help="held-out examples for the final accuracy")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    a = p.parse_args()
    stages = [tuple(int(x) for x in stage.split(":")) for stage in a.stages.split(",")]
    main(a.out, a.seed, a.vocab_size, stages, a.batch_size, a.lr, a.task_weight, a.n_eval, a.threads)
