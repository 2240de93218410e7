"""``evaluate``: a prefix's KV through the real host pool and back, then scored.

Mechanics on a tiny seeded Llama (``tiny_lm``); one check on the real SmolLM2-135M.
"""

from __future__ import annotations

import math

import pytest
import torch

from tiny_lm import LAYERS, TEXTS, text

PREFIX = 64
CONTINUATION = 33
PAGE = 32


@pytest.fixture(scope="module")
def tiny(kvtools, tiny_model_dir):
    return kvtools.kv_model.load_model(str(tiny_model_dir))


def run(kvtools, lm, specs, **kw):
    ev = kvtools.evaluate
    configs = [ev.parse_config(spec) for spec in specs]
    kw = {"prefix_tokens": PREFIX, "continuation_tokens": CONTINUATION, "page_size": PAGE, **kw}
    return ev.evaluate(lm, text("kjv-luke.txt"), configs, progress=False, **kw)


def test_pool_equals_codec_same_bytes_same_scores(kvtools, tiny):
    (pool,) = run(kvtools, tiny, ["k4v2"], via="pool")
    (codec,) = run(kvtools, tiny, ["k4v2"], via="codec")
    trip = pool.roundtrip
    assert trip.pages.shape[0] == PREFIX // PAGE
    for layer in range(LAYERS):
        for page in range(PREFIX // PAGE):
            for is_value in (0, 1):
                off, n = trip.layout.blob(layer, bool(is_value))
                got = bytes(trip.pages[page, off : off + n].numpy())
                assert got == codec.roundtrip.blobs[layer][page][is_value], (layer, page)
                off, n = trip.layout.sink(layer, bool(is_value))
                got = bytes(trip.pages[page, off : off + n].numpy())
                assert got == codec.roundtrip.sinks[layer][page][is_value], (layer, page)
                assert n == trip.layout.sink_token_nbytes  # one sink token by default
    assert torch.equal(trip.k, codec.roundtrip.k) and torch.equal(trip.v, codec.roundtrip.v)
    assert pool.perplexity == codec.perplexity and pool.kl == codec.kl
    assert pool.kl > 0 and pool.scored_tokens == CONTINUATION - 1
    assert pool.nominal_bits == 3.0
    # Page rows carry the page header and 64-byte blob alignment on top of the blobs.
    assert pool.effective_bits > codec.effective_bits > 3.0


def test_unquantized_is_exactly_zero_and_quantizing_costs(kvtools, tiny):
    none, k8, k2 = run(kvtools, tiny, ["none", "k8v8", "k2v2"])
    assert none.ppl_change_pct == 0.0 and none.kl == 0.0
    assert none.nominal_bits == 16 and none.effective_bits == 16
    assert 0 < k8.kl < k2.kl
    assert k2.tokens_per_gib > k8.tokens_per_gib > none.tokens_per_gib
    assert math.isfinite(k2.perplexity)


def test_host_route_serves_the_residual_window_exactly(kvtools, tiny):
    storage, host = (
        run(kvtools, tiny, ["k2v2:r=32"], route=route)[0] for route in ("storage", "host")
    )
    ref = run(kvtools, tiny, ["none"])[0].roundtrip
    # The last page (32 tokens) comes back exact from the overlay on the host route only.
    assert torch.equal(host.roundtrip.k[:, -PAGE:], ref.k[:, -PAGE:])
    assert not torch.equal(storage.roundtrip.k[:, -PAGE:], ref.k[:, -PAGE:])
    assert host.kl < storage.kl
    assert host.effective_bits > storage.effective_bits


def test_preset_through_the_pool(kvtools, tiny, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        "".join(f"{i}: {{nbits_key: 8, nbits_value: 2}}\n" for i in range(LAYERS - 1))
    )
    (r,) = run(kvtools, tiny, [f"{preset}:g=32"])
    # Unlisted last layer: the uniform default K4V4.
    assert r.roundtrip.layer_bits == ((8, 2),) * (LAYERS - 1) + ((4, 4),)
    assert r.nominal_bits == pytest.approx((5 * (LAYERS - 1) + 4) / LAYERS)


def test_preset_naming_a_layer_the_model_lacks_is_refused(kvtools, tiny, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        f"0: {{nbits_key: 4, nbits_value: 2}}\n{LAYERS}: {{nbits_key: 4, nbits_value: 2}}\n"
    )
    with pytest.raises(
        ValueError, match=f"names layers {LAYERS} but the model has {LAYERS} layers"
    ):
        run(kvtools, tiny, [str(preset)])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("k3v2", "is not one of"),
        ("k4v2:g=0", "must be > 0"),
        ("k4v2:x=1", "unknown option"),
        ("fp8", "expected 'none'"),
        ("none:g=32", "takes no options"),
        ("missing.yaml", "no such file"),
    ],
)
def test_bad_config_specs(kvtools, spec, message):
    with pytest.raises(ValueError, match=message) as e:
        kvtools.evaluate.parse_config(spec)
    assert spec in str(e.value)


def test_text_shorter_than_prefix_plus_continuation(kvtools, tiny):
    with pytest.raises(ValueError, match="has 20 tokens, fewer than prefix 64 \\+ continuation 33"):
        kvtools.evaluate.evaluate(
            tiny,
            "x" * 20,
            [kvtools.evaluate.parse_config("k4v4")],
            prefix_tokens=PREFIX,
            continuation_tokens=CONTINUATION,
            page_size=PAGE,
            progress=False,
        )


class _Skipping:
    """``lm`` with the first ``skip`` tokens of every text dropped."""

    def __init__(self, lm, skip):
        self.lm, self.skip = lm, skip

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def encode(self, text):
        return self.lm.encode(text)[self.skip :]


def test_windows_pool_their_scored_tokens(kvtools, tiny):
    specs = ["none", "k2v2"]
    both = run(kvtools, tiny, specs, windows=2)
    alone = [run(kvtools, _Skipping(tiny, w * (PREFIX + CONTINUATION)), specs) for w in (0, 1)]
    n = [r[1].scored_tokens for r in alone]
    assert both[1].scored_tokens == sum(n) == 2 * (CONTINUATION - 1)
    assert alone[0][1].kl != alone[1][1].kl  # two different windows
    kl = sum(r[1].kl * m for r, m in zip(alone, n)) / sum(n)
    assert both[1].kl == pytest.approx(kl, rel=1e-9)
    nll = sum(math.log(r[1].perplexity) * m for r, m in zip(alone, n))
    ref = sum(math.log(r[0].perplexity) * m for r, m in zip(alone, n))
    assert both[1].perplexity == pytest.approx(math.exp(nll / sum(n)), rel=1e-9)
    assert both[1].ppl_change_pct == pytest.approx(
        100 * (math.exp((nll - ref) / sum(n)) - 1), rel=1e-6
    )
    assert both[0].ppl_change_pct == 0.0 and both[0].kl == 0.0


def test_more_windows_than_the_text_holds(kvtools, tiny):
    fits = len(tiny.encode(text("kjv-luke.txt"))) // (PREFIX + CONTINUATION)
    with pytest.raises(ValueError, match=f"{fits} window\\(s\\) .* --windows {fits + 1} asked"):
        run(kvtools, tiny, ["k4v4"], windows=fits + 1)
    with pytest.raises(ValueError, match="--windows 0 must be >= 1"):
        run(kvtools, tiny, ["k4v4"], windows=0)


def test_prefix_must_be_whole_pages(kvtools, tiny):
    with pytest.raises(ValueError, match="must be whole pages of --page-size 32"):
        run(kvtools, tiny, ["k4v4"], prefix_tokens=48)


def test_unknown_model_path(kvtools, tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        kvtools.kv_model.load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        kvtools.kv_model.load_model(str(tmp_path))


def test_cli_reports_bad_input_and_exits_2(kvtools, tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    argv = ["--model", str(tiny_model_dir), "--text", str(short), "--config", "k4v4"]
    with pytest.raises(SystemExit) as e:
        kvtools.evaluate.main(argv)
    assert e.value.code == 2
    assert "fewer than prefix 512 + continuation 512" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        kvtools.evaluate.main(["--model", str(tmp_path / "nope")] + argv[2:])
    assert e.value.code == 2 and "no such file or directory" in capsys.readouterr().err
    # calibrate refuses a sink as long as a page before it loads the model or writes anything
    out = tmp_path / "p.yaml"
    with pytest.raises(SystemExit) as e:
        kvtools.calibrate.main(
            ["--avg-bits", "3", "--out", str(out), "--sink-tokens", "64"] + argv[:4]
        )
    assert e.value.code == 2 and "sink-tokens=64 keeps a whole page" in capsys.readouterr().err
    assert not out.exists()


def test_cli_prints_the_table(kvtools, tiny_model_dir, capsys):
    kvtools.evaluate.main(
        [
            "--model",
            str(tiny_model_dir),
            "--text",
            str(TEXTS / "kjv-luke.txt"),
            "--config",
            "none",
            "--config",
            "k4v2",
            "--prefix-tokens",
            "64",
            "--continuation-tokens",
            "33",
            "--page-size",
            "32",
        ]
    )
    out = capsys.readouterr().out
    assert "| none | 16.00 | 16.00 |" in out and "| k4v2 | 3.00 |" in out


def test_smollm2_k4v4_through_the_pool(kvtools):
    """The real model: K4V4 (KIVI axes, group 32) costs little but not nothing."""
    lm = kvtools.kv_model.load_model(kvtools.kv_model.SMOLLM2)
    ev = kvtools.evaluate
    results = ev.evaluate(
        lm,
        text("kjv-luke.txt"),
        [ev.parse_config("k4v4"), ev.parse_config("k2v2")],
        prefix_tokens=128,
        continuation_tokens=33,
        page_size=64,
        progress=False,
    )
    k4, k2 = results
    assert 0 < k4.kl < k2.kl
    assert abs(k4.ppl_change_pct) < 3.0
    assert k4.roundtrip.k.shape == (30, 128, 3, 64)
    # 30 layers x 3 KV heads x 64 dims x K/V x fp16 = 23040 B/token unquantized.
    assert k4.tokens_per_gib > 2.5 * (1 << 30) // 23040
