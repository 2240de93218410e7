"""Build (once) a tiny DeepSeek-V2-shaped model with seeded random weights, and print its
directory.

The live MLA test (``tests/python/test_live_mla.py``) serves it on SGLang's CPU engine: no MLA
model fits these machines, and a random one is enough to run SGLang's MLA path (its
``MLATokenToKVPool`` and ``MLATokenToKVPoolHost``) end to end. The shape is DeepSeek's where the
KV cache sees it (``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64, so 576 values per token and
layer; ``qk_nope_head_dim`` and ``v_head_dim`` 128, no query LoRA) and tiny elsewhere (2 layers,
4 heads, hidden size 256, dense MLPs only: ``first_k_dense_replace`` covers every layer). The
tokenizer is SmolLM2's, from the directory ``scripts/demo_model.py`` makes.

Cached outside the checkout, keyed by a digest of the config, the seed and the tokenizer's
directory name, and published by renaming a finished temp directory:
    ${KVTUNER_CACHE:-~/.cache/kvtuner-patch}/models/tiny-deepseek-v2-<digest>

usage: python scripts/mla_model.py    (needs torch, transformers and safetensors)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_model import cache_dir, cached_model_dir, converted_model_dir  # noqa: E402

SEED = 0
# Part of the cache key: bump it whenever _build makes different weights from the same CONFIG.
RECIPE_VERSION = 1
# Linear weights keep activations at unit size (std 1/sqrt(fan_in)); the output head is
# LOGIT_GAIN times that, so next-token distributions are peaked (few near ties) and a greedy
# token does not flip on bf16 rounding noise.
LOGIT_GAIN = 4.0
CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "first_k_dense_replace": 2,
    "moe_layer_freq": 1,
    "n_routed_experts": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 128,
    "num_experts_per_tok": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    # SGLang's CPU engine builds DeepSeek's rotary embedding only as "deepseek_yarn"
    # (factory.get_rope_cpu asserts it); factor 1 is plain RoPE with YaRN's bookkeeping.
    "rope_scaling": {
        "type": "yarn",
        "factor": 1.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def model_key(tokenizer_dir: Path) -> str:
    """The cache key: a digest of the recipe version, config, seed and tokenizer source."""
    recipe = {
        "version": RECIPE_VERSION,
        "config": CONFIG,
        "seed": SEED,
        "logit_gain": LOGIT_GAIN,
        "tokenizer": tokenizer_dir.name,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def tiny_mla_model_dir() -> Path:
    """The cached model directory, built first if it is not there yet."""
    tokenizer_dir = converted_model_dir()
    out = cache_dir() / "models" / f"tiny-deepseek-v2-{model_key(tokenizer_dir)}"
    return cached_model_dir(out, lambda tmp: _build(tokenizer_dir, tmp))


def _weight_shapes(vocab: int) -> dict:
    """Every tensor SGLang's DeepseekV2ForCausalLM loads, by checkpoint name."""
    c = CONFIG
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    rank, rope = c["kv_lora_rank"], c["qk_rope_head_dim"]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * qk_head, hidden)
        shapes[p + "self_attn.kv_a_proj_with_mqa.weight"] = (rank + rope, hidden)
        shapes[p + "self_attn.kv_a_layernorm.weight"] = (rank,)
        kv_b_rows = heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
        shapes[p + "self_attn.kv_b_proj.weight"] = (kv_b_rows, rank)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * c["v_head_dim"])
        shapes[p + "mlp.gate_proj.weight"] = (c["intermediate_size"], hidden)
        shapes[p + "mlp.up_proj.weight"] = (c["intermediate_size"], hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, c["intermediate_size"])
    return shapes


def _build(tokenizer_dir: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    source = json.loads((tokenizer_dir / "config.json").read_text())
    config = dict(CONFIG)
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        if key in source:
            config[key] = source[key]
    generator = torch.Generator().manual_seed(SEED)
    weights = {}
    for name, shape in _weight_shapes(config["vocab_size"]).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        scale = 1.0 if name == "model.embed_tokens.weight" else shape[1] ** -0.5
        if name == "lm_head.weight":
            scale *= LOGIT_GAIN
        w = torch.randn(shape, generator=generator) * scale
        weights[name] = w.to(torch.bfloat16).contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    print(tiny_mla_model_dir())
