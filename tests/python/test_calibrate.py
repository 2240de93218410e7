"""``calibrate``: per-layer K/V bits under a budget, by measured KL (tiny seeded Llama)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tiny_lm import LAYERS, TEXTS, text

TEXT_NAMES = ("kjv-genesis.txt", "kjv-proverbs.txt")
OPTIONS = {"prefix_tokens": 64, "continuation_tokens": 33, "windows_per_text": 2, "page_size": 32}


@pytest.fixture(scope="module")
def tiny(kvtools, tiny_model_dir):
    return kvtools.kv_model.load_model(str(tiny_model_dir))


def calibrated(kvtools, lm, budget):
    cal = kvtools.calibrate
    calibrator = cal.Calibrator(
        lm, [(name, text(name)) for name in TEXT_NAMES], progress=False, **OPTIONS
    )
    result = cal.search(calibrator, calibrator.sensitivity(), budget)
    return calibrator, result, cal.preset_yaml(result, calibrator, "tiny")


@pytest.fixture(scope="module")
def three_bits(kvtools, tiny):
    return calibrated(kvtools, tiny, 3.0)


def test_preset_parses_with_the_pools_loader_and_respects_the_budget(kvtools, three_bits, tmp_path):
    calibrator, result, yaml_text = three_bits
    path = tmp_path / "preset.yaml"
    path.write_text(yaml_text)
    loaded = kvtools.config.load_layer_preset(str(path))
    assert loaded == dict(enumerate(result.layer_bits))
    assert len(loaded) == LAYERS
    assert result.nominal_bits <= 3.0
    assert calibrator.scored_tokens == len(TEXT_NAMES) * 2 * 32
    assert "# budget: 3 average bits" in yaml_text and "# model: tiny (4 layers)" in yaml_text


def test_never_worse_than_the_uniform_config_of_equal_bits(three_bits):
    calibrator, result, _ = three_bits
    assert result.uniform in ((4, 2), (2, 4))
    assert result.cost <= result.uniform_cost
    assert result.cost == calibrator.cost(result.layer_bits)  # a measured cost, not an estimate
    assert result.cost <= result.additive_cost


def test_reproducible(kvtools, tiny, three_bits):
    assert calibrated(kvtools, tiny, 3.0)[2] == three_bits[2]


def test_sensitivity_table(three_bits, kvtools):
    calibrator, _, _ = three_bits
    table = calibrator.sensitivity()  # memoised: no new measurements
    for layer in range(LAYERS):
        for which in (0, 1):
            assert table[(layer, which, 2)] > table[(layer, which, 4)] > 0
            assert table[(layer, which, 8)] == 0.0


def test_sensitivity_at_fewer_bits_and_windows_extrapolates(three_bits, kvtools):
    calibrator, _, _ = three_bits
    table = calibrator.sensitivity(bits=(2,), windows=1)
    for layer in range(LAYERS):
        assert table[(layer, 0, 4)] == table[(layer, 0, 2)] / 16
        assert table[(layer, 0, 2)] == calibrator.cost(
            [(2, None) if i == layer else (None, None) for i in range(LAYERS)], windows=1
        )
    with pytest.raises(ValueError, match="must be among 2, 4"):
        calibrator.sensitivity(bits=(8,))


def test_additive_optimum_is_exact_and_within_budget(kvtools):
    cal = kvtools.calibrate
    # Layer 0 is sensitive in K, layer 1 in V, the others nowhere.
    table = {}
    for layer in range(4):
        for which in (0, 1):
            big = (layer, which) in ((0, 0), (1, 1))
            table[(layer, which, 2)] = 10.0 if big else 0.01
            table[(layer, which, 4)] = 1.0 if big else 0.001
            table[(layer, which, 8)] = 0.0
    assert cal.additive_optimum(table, 4, 3.5) == ((8, 2), (2, 8), (2, 2), (2, 2))
    # 3.0 bits leave 4 bits fewer: one of the sensitive tensors drops to 4 bits.
    assert cal.additive_optimum(table, 4, 3.0) in (
        ((4, 2), (2, 8), (2, 2), (2, 2)),
        ((8, 2), (2, 4), (2, 2), (2, 2)),
    )
    assert cal.additive_optimum(table, 4, 2.0) == ((2, 2),) * 4
    assert cal.uniform_candidates(3.0) == [(4, 2), (2, 4)]
    assert cal.uniform_candidates(2.5) == [(2, 2)]


@pytest.mark.parametrize("budget", [1.5, 8.5, float("nan")])
def test_budget_outside_2_to_8_is_refused(kvtools, budget):
    with pytest.raises(ValueError, match="is outside 2..8"):
        kvtools.calibrate.check_budget(budget)


def test_cli_writes_the_preset(kvtools, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    argv = [
        "--model",
        str(tiny_model_dir),
        "--avg-bits",
        "2.5",
        "--out",
        str(out),
        "--prefix-tokens",
        "64",
        "--continuation-tokens",
        "33",
        "--page-size",
        "32",
        "--windows-per-text",
        "1",
        "--rounds",
        "2",
    ]
    for name in TEXT_NAMES:
        argv += ["--text", str(TEXTS / name)]
    kvtools.calibrate.main(argv)
    bits = kvtools.config.load_layer_preset(str(out))
    assert sum(k + v for k, v in bits.values()) / (2 * LAYERS) <= 2.5
    assert "written to" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        (["--avg-bits", "1.5"], "--avg-bits 1.5 is outside 2..8"),
        (["--avg-bits", "9"], "--avg-bits 9.0 is outside 2..8"),
        (["--model", "/nonexistent/model"], "no such file or directory"),
        (["--text", "/nonexistent.txt"], "cannot read it"),
        (["--prefix-tokens", "65536"], "fewer than prefix 65536"),
    ],
)
def test_cli_bad_input(kvtools, tiny_model_dir, tmp_path, capsys, change, message):
    argv = [
        "--model",
        str(tiny_model_dir),
        "--avg-bits",
        "3",
        "--out",
        str(tmp_path / "p.yaml"),
        "--text",
        str(TEXTS / TEXT_NAMES[0]),
        "--page-size",
        "32",
    ]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in argv and flag != "--text":
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as e:
        kvtools.calibrate.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_replaying_unchanged_layers_gives_the_same_scores(kvtools, tiny):
    """The sensitivity runs skip the layers before the quantized one (their outputs are
    replayed from the reference run): that must change nothing."""
    ids = tiny.encode(text("kjv-romans.txt"))[:96]
    k, v = tiny.prefix_kv(ids[:64])
    _, outputs = tiny.reference_layer_outputs(k, v, ids[64:])
    k_q = k.clone()
    k_q[2:] = k_q[2:].half().float() * 1.01  # perturb layers 2 and 3 only
    full = tiny.continuation_logprobs(k_q, v, ids[64:])
    replayed = tiny.continuation_logprobs(k_q, v, ids[64:], layer_outputs=outputs, first_layer=2)
    assert torch.equal(full, replayed)
    # Replaying a layer whose KV did change is wrong, and visibly so.
    wrong = tiny.continuation_logprobs(k_q, v, ids[64:], layer_outputs=outputs, first_layer=3)
    assert not torch.equal(full, wrong)


def test_calibrated_preset_naming_a_layer_the_model_lacks_is_refused(
    kvtools, tiny, three_bits, tmp_path
):
    """The calibrated preset with one layer too many: the pool refuses it, naming the layer."""
    path = tmp_path / "preset.yaml"
    path.write_text(three_bits[2] + f"{LAYERS}: {{nbits_key: 8, nbits_value: 8}}\n")
    ev = kvtools.evaluate
    with pytest.raises(ValueError, match=f"names layers {LAYERS} but the model has {LAYERS}"):
        ev.evaluate(
            tiny,
            text("kjv-luke.txt"),
            [ev.parse_config(str(path))],
            prefix_tokens=64,
            continuation_tokens=33,
            page_size=32,
            progress=False,
        )


def test_sink_tokens_of_every_page_stay_exact(kvtools, tiny):
    """The first sink tokens of every page come back exact, as the pool loads them, the
    others as without them (the tiny random model has no attention sink, so costs are not
    compared)."""
    cal = kvtools.calibrate
    texts = [(name, text(name)) for name in TEXT_NAMES]
    base = kvtools.evaluate.DEFAULT_CONFIG
    plain = cal.Calibrator(
        tiny, texts, progress=False, base=replace(base, sink_tokens=0), **OPTIONS
    )
    sink = cal.Calibrator(tiny, texts, progress=False, base=replace(base, sink_tokens=2), **OPTIONS)
    x = sink.windows[0].k
    bits = [2] * LAYERS
    q_sink, q_plain = sink._quantize(x, bits, 1), plain._quantize(x, bits, 1)
    page = OPTIONS["page_size"]
    head = torch.zeros(x.shape[1], dtype=torch.bool)
    head[torch.arange(0, x.shape[1], page)] = True
    head[torch.arange(1, x.shape[1], page)] = True
    assert torch.equal(q_sink[:, head], x[:, head]) and not torch.equal(
        q_plain[:, head], x[:, head]
    )
    assert torch.equal(q_sink[:, ~head], q_plain[:, ~head])
    result = cal.search(sink, sink.sensitivity(), 3.0, rounds=0)
    assert "sink tokens 2," in cal.preset_yaml(result, sink, "tiny")
    with pytest.raises(ValueError, match="--kvtuner-hicache-sink-tokens=32 keeps a whole page"):
        cal.Calibrator(tiny, texts, progress=False, base=replace(base, sink_tokens=32), **OPTIONS)
