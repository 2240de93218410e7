"""Small real models for the evaluate/calibrate suites.

``tiny_model_dir``: a Hugging Face model directory holding a randomly initialised (seeded)
4-layer Llama and a byte-level tokenizer, built with transformers itself: the mechanics of
the evaluation (pool round trip, scoring, search) at a fraction of a second per forward.
``kvtools``: the package's evaluate/calibrate modules (injected copies when a patched tree
is under test, else the standalone package, as conftest's ``kvh``).
"""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

from conftest import PATCHED, ROOT

TEXTS = ROOT / "benches" / "texts"
LAYERS = 4
HEAD_DIM = 32
KV_HEADS = 2


@pytest.fixture(scope="session")
def kvtools(sgl):
    base = "sglang.srt.mem_cache.kvtuner_hicache" if PATCHED else "kvtuner_hicache"
    return types.SimpleNamespace(
        **{
            name: importlib.import_module(f"{base}.{name}")
            for name in ("config", "kv_model", "evaluate", "calibrate")
        }
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    where = tmp_path_factory.mktemp("tiny-llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(where)
    config = LlamaConfig(
        vocab_size=len(alphabet),
        hidden_size=KV_HEADS * HEAD_DIM,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=KV_HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        initializer_range=0.2,  # sharper next-token distributions than the default 0.02
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(where)
    return where


def text(name: str) -> str:
    return (TEXTS / name).read_text(encoding="utf-8")
