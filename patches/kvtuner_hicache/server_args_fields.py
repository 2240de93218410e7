"""The KVTuner quantized-HiCache server arguments, declared once for every SGLang release.

kvtuner-patch injects the body of :class:`KvtunerHicacheFields` (below its docstring) into each
release's own argument declarations, or renders it as dataclass fields and
``parser.add_argument`` calls for 0.5.3 - 0.5.13, so only what that renderer reads may appear
here: types ``bool`` (default ``False``), ``int``, ``float``, ``str`` and ``Optional`` of those,
``Arg(help=<string literals>, choices=[...])``, a literal default. Where each era gets the
fields: ``src/groups/kvtuner.rs`` and ``docs/compat.md``. The body may only use names the target
module imports (``A``, ``Arg``, ``Optional``). Importing this file needs SGLang >= 0.5.20, so
``config.py`` reads the names and defaults from its text; the ``hostpool`` group injects it
with the package for that.
"""

from __future__ import annotations

from typing import Optional

import msgspec

from sglang.srt.arg_groups.arg_utils import A, Arg


class KvtunerHicacheFields(msgspec.Struct):
    """The server arguments kvtuner-patch adds (the CLI contract of the tool)."""

    # -------------------------------------------------------------------------
    # KVTuner quantized hierarchical cache (injected by kvtuner-patch)
    # -------------------------------------------------------------------------
    enable_kvtuner_hicache: A[
        bool,
        Arg(
            help=(
                "Store HiCache host-memory pages quantized with KVTuner (packed "
                "low-bit codes plus per-group scale/zero), so the same "
                "--hicache-size holds several times more tokens; storage backends "
                "receive the quantized pages. Requires --enable-hierarchical-cache."
            ),
        ),
    ] = False
    kvtuner_hicache_nbits_key: A[
        int,
        Arg(
            help=(
                "Bits per quantized key element in the KVTuner HiCache host pool. "
                "MLA models (DeepSeek, Kimi, GLM): the bits of the compressed latent, "
                "which serves as keys and values (the rope keys stay exact). "
                "Overridden per layer by --kvtuner-hicache-layer-config."
            ),
            choices=[2, 4, 8],
        ),
    ] = 4
    kvtuner_hicache_nbits_value: A[
        int,
        Arg(
            help=(
                "Bits per quantized value element in the KVTuner HiCache host pool "
                "(unused by MLA models, whose latent takes the key bits). "
                "Overridden per layer by --kvtuner-hicache-layer-config."
            ),
            choices=[2, 4, 8],
        ),
    ] = 4
    kvtuner_hicache_asym: A[
        bool,
        Arg(
            help=(
                "Use asymmetric quantization (per-group scale and zero point) for "
                "KVTuner HiCache pages. Without this flag quantization is "
                "symmetric (scale only)."
            ),
        ),
    ] = False
    kvtuner_hicache_axis_key: A[
        int,
        Arg(
            help=(
                "Quantization axis for keys (MLA models: for the latent): 1 groups "
                "along the token axis within each channel (per-channel, as KIVI does "
                "for keys), 0 groups along the channel axis within each token "
                "(per-token)."
            ),
            choices=[0, 1],
        ),
    ] = 1
    kvtuner_hicache_axis_value: A[
        int,
        Arg(
            help=(
                "Quantization axis for values: 0 groups along the channel axis "
                "within each token (per-token, as KIVI does for values), 1 groups "
                "along the token axis within each channel (per-channel)."
            ),
            choices=[0, 1],
        ),
    ] = 0
    kvtuner_hicache_q_group_size: A[
        int,
        Arg(
            help=(
                "Number of elements sharing one scale (and zero point) in KVTuner "
                "HiCache quantization."
            ),
        ),
    ] = 64
    kvtuner_hicache_residual_length: A[
        int,
        Arg(
            help=(
                "Number of most recent tokens of each host-pool backup kept in full "
                "precision within the host budget, so they are restored exactly. "
                "0 disables the residual window."
            ),
        ),
    ] = 128
    kvtuner_hicache_sink_tokens: A[
        int,
        Arg(
            help=(
                "Number of first tokens of every host page also stored in full "
                "precision. Every sequence starts a page, so its first token (the "
                "attention sink that most heads attend to) is restored exactly; "
                "costs this many fp16 tokens per page. 0 disables."
            ),
        ),
    ] = 1
    kvtuner_hicache_layer_config: A[
        Optional[str],
        Arg(
            help=(
                "Path to a KVTuner calibration preset YAML giving per-layer bits "
                "(layer_idx: {nbits_key: N, nbits_value: M}); layers it does not "
                "list use --kvtuner-hicache-nbits-key/--kvtuner-hicache-nbits-value."
            ),
        ),
    ] = None
    kvtuner_hicache_codec: A[
        str,
        Arg(
            help=(
                "Who packs KVTuner HiCache pages: 'device' runs Triton kernels that "
                "quantize on the GPU and write the packed pages straight into pinned "
                "host memory (no host sync, quantized bytes over PCIe); 'host' runs "
                "the kvtuner_quant CPU codec; 'auto' picks 'device' when the KV "
                "cache is on a CUDA/ROCm device and Triton imports, else 'host'. "
                "Both write identical bytes."
            ),
            choices=["auto", "device", "host"],
        ),
    ] = "auto"
