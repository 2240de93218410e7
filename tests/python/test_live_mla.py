"""A real ``python -m sglang.launch_server`` (SGLang's CPU engine) serving a tiny
DeepSeek-V2-shaped model with random weights (``scripts/mla_model.py``) with
``--enable-kvtuner-hicache``: SGLang builds the quantizing MLA host pool, a prompt pushed out of
the device pool comes back from it, and after a restart from L3 (``file``), with the cold
run's greedy tokens, which are Transformers' own DeepSeek-V2's. Each server is stopped by the test, also on failure
(``tests/live/server.py``)."""

from __future__ import annotations

import sys

import pytest
from packaging.version import Version

from conftest import PATCHED, ROOT, requires_patched

sys.path.insert(0, str(ROOT / "tests" / "live"))
from server import (  # noqa: E402
    LiveServer,
    kjv_documents,
    pool_bytes_per_token,
    pool_startup_line,
)

if PATCHED:
    from sglang.version import __version__ as RELEASE
else:
    RELEASE = "0"

pytestmark = [
    requires_patched,
    pytest.mark.skipif(
        Version(RELEASE) < Version("0.5.22"),
        reason=f"SGLang {RELEASE}'s CPU engine serves pages of one token only (its paged "
        "allocator has only Triton kernels); this test needs pages of 64 (0.5.22+)",
    ),
]

# As in test_live_server.py: a device pool the three other documents push the prompt out of,
# and at least this much of the ~1.4k-token prompt back as whole pages of 64 tokens.
DEVICE_TOKENS = "3072"
MIN_HIT_TOKENS = 1024


@pytest.fixture(scope="module")
def mla_model():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from mla_model import tiny_mla_model_dir
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return str(tiny_mla_model_dir())


def transformers_greedy(model, prompt, max_new_tokens=8):
    """The greedy continuation Transformers' DeepseekV2ForCausalLM gives (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :])


def mla_server(model, log_path, *args, env=None):
    return LiveServer(
        sys.executable,
        PATCHED,
        model,
        ["--max-total-tokens", DEVICE_TOKENS, "--hicache-ratio", "2", *args],
        log_path,
        mla_attention=True,
        env=env,
    )


def assert_no_traceback(srv):
    assert srv.tracebacks() == [], f"{srv.log_path}:\n" + "\n\n".join(srv.tracebacks())


def test_mla_host_hit_then_storage_hit(mla_model, tmp_path):
    # The product defaults (4-bit symmetric latent, group 64, one sink token per page) with
    # no residual window, so every page of the hit is a quantized row. The model's output
    # head makes its next-token distributions peaked (scripts/mla_model.py): 4-bit latents
    # keep its greedy tokens, which a trained model's near ties would not promise.
    l3_dir = tmp_path / "l3"
    l3_dir.mkdir()
    args = (
        "--enable-kvtuner-hicache",
        "--kvtuner-hicache-residual-length",
        "0",
        "--hicache-storage-backend",
        "file",
    )
    env = {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": str(l3_dir)}
    prompt, *others = kjv_documents()[:4]

    first = mla_server(mla_model, tmp_path / "mla-1.log", *args, env=env)
    try:
        first.start()
        line = pool_startup_line(first.log()) or ""
        assert line.startswith("KVTuner HiCache MLA host pool: kvt-mla-bf16-l4-"), first.log_tail()
        ours, stock = pool_bytes_per_token(first.log())
        # Two layers of 576 bf16 values stock; a 4-bit latent, exact rope keys and padding.
        assert stock == 2 * 576 * 2 and stock >= 2.5 * ours, (ours, stock)
        cold = first.generate(prompt)
        assert cold.cached_tokens == 0, cold
        # The CPU engine computes the model (MLA attention through the scaffolding) right.
        assert cold.text == transformers_greedy(mla_model, prompt), cold
        for doc in others:
            first.generate(doc, max_new_tokens=1)
        again = first.generate(prompt)
        assert again.host >= MIN_HIT_TOKENS and again.device < MIN_HIT_TOKENS, again
        assert again.text == cold.text
    finally:
        first.stop()
    assert_no_traceback(first)
    assert any(l3_dir.rglob("*")), "no page reached the file backend"

    second = mla_server(mla_model, tmp_path / "mla-2.log", *args, env=env)
    try:
        second.start()
        from_storage = second.generate(prompt)
        assert from_storage.storage >= MIN_HIT_TOKENS, from_storage
        assert from_storage.text == cold.text
    finally:
        second.stop()
    assert_no_traceback(second)
