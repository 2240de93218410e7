"""The nine KVTuner quantized-HiCache server arguments: the one description of the CLI.

Every era of SGLang gets these flags from this file (``src/groups/kvtuner.rs``):

- 0.5.20 - 0.5.23: the body of :class:`KvtunerHicacheFields` (everything below its
  docstring) is appended to ``class Memory(msgspec.Struct)`` in
  ``sglang/srt/arg_groups/fields/memory.py``.
- 0.5.14 - 0.5.19: the same body goes into ``@dataclass class ServerArgs`` in
  ``sglang/srt/server_args.py``, after ``hicache_storage_backend_extra_config``.
- 0.5.3 - 0.5.13 (explicit ``parser.add_argument`` calls): kvtuner-patch reads name, type,
  default, ``choices`` and ``help`` of each declaration below and renders them as plain
  dataclass fields (``name: T = default``) plus one ``parser.add_argument(...)`` per flag
  in ``ServerArgs.add_cli_args``, after ``--hicache-storage-backend-extra-config``.
  So only what that renderer understands may appear here: types ``bool`` (default
  ``False``: a ``store_true`` flag), ``int``, ``float``, ``str``, ``Optional[...]`` of those;
  ``Arg(help=<string literals>, choices=[...])``; a literal default.

In the two annotated eras SGLang derives one ``--kebab-case`` flag per field
(``enable_kvtuner_hicache`` -> ``--enable-kvtuner-hicache``): ``bool`` fields become
``store_true`` flags, ``choices`` are checked by argparse after ``int`` conversion, and the
values are read at runtime as ``server_args.<field>`` (or ``get_memory().<field>``).

The body may only use names that the target module itself imports (``A``, ``Arg``,
``Optional``): SGLang resolves the annotations there. The patch engine checks that they
are bound before it injects anything.

This file is also a valid module on its own: importing it (with SGLang >= 0.5.20
installed) builds the struct, which is how the declarations are tested outside a patched
tree.
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
                "Overridden per layer by --kvtuner-hicache-layer-config."
            ),
            choices=[2, 4, 8],
        ),
    ] = 4
    kvtuner_hicache_nbits_value: A[
        int,
        Arg(
            help=(
                "Bits per quantized value element in the KVTuner HiCache host pool. "
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
                "Quantization axis for keys: 1 groups along the token axis within "
                "each channel (per-channel, as KIVI does for keys), 0 groups along "
                "the channel axis within each token (per-token)."
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
