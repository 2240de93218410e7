"""The preset check counts the model's layers from start_layer and the pool's layer count.

SGLang's ``MHATokenToKVPool`` defaults ``end_layer`` to the last layer (inclusive) when a
caller omits the layer range, while the model runner passes the exclusive end: counting
from ``end_layer`` refused a valid preset naming the last layer of such a pool.
"""

from __future__ import annotations

import inspect

import pytest
import torch

LAYERS = 4
PAGE = 32


def make_cfg(kvh, preset):
    return kvh.config.KVTunerHiCacheConfig(
        enabled=True,
        nbits_key=4,
        nbits_value=4,
        asym=True,
        group_size=32,
        residual_length=0,
        layer_bits=tuple(sorted(preset.items())),
        layer_config="preset.yaml",
    )


def pool_without_layer_range(sgl):
    return sgl["memory_pool"].MHATokenToKVPool(
        size=256,
        page_size=PAGE,
        dtype=torch.float16,
        head_num=2,
        head_dim=64,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
    )


def host_pool_for(sgl, kvh, dev, cfg):
    """What a caller passing the device pool's own layer range builds."""
    source, geometry = dev, {}
    params = inspect.signature(sgl["mha"].MHATokenToKVPoolHost.__init__).parameters
    if "buffer_info" in params:  # 0.5.23
        source = dev.get_device_pool_infos()[0].buffer_info
        geometry = {
            "device_capacity_tokens": dev.size,
            "start_layer": dev.start_layer,
            "end_layer": dev.end_layer,
        }
    return kvh.host_pool.KVTunerMHATokenToKVPoolHost(
        source,
        0.0,
        0.01,
        PAGE,
        "page_first",
        pin_memory=False,
        device="cpu",
        kvtuner_config=cfg,
        **geometry,
    )


def test_device_pool_default_end_layer_is_inclusive(sgl):
    # The premise of the fix: if SGLang changes it, the fix is still right, but say so.
    assert pool_without_layer_range(sgl).end_layer == LAYERS - 1


def test_preset_naming_the_last_layer_is_accepted(sgl, kvh):
    dev = pool_without_layer_range(sgl)
    host = host_pool_for(sgl, kvh, dev, make_cfg(kvh, {0: (8, 4), LAYERS - 1: (2, 2)}))
    assert host.kvtuner_plan.layer_bits == ((8, 4), (4, 4), (4, 4), (2, 2))


def test_preset_naming_a_layer_the_model_lacks_is_refused(sgl, kvh):
    dev = pool_without_layer_range(sgl)
    with pytest.raises(
        ValueError, match=f"names layers {LAYERS} but the model has {LAYERS} layers"
    ):
        host_pool_for(sgl, kvh, dev, make_cfg(kvh, {0: (8, 4), LAYERS: (2, 2)}))
