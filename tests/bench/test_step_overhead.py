"""The micro-benchmark's configurations are what their names say: a wrong slot list measures another load.

(mix16 once reached only four LoRA and four MiSS slots, and its ratio was read as 16 adapters' for weeks.)
"""

from __future__ import annotations

import re

from bench.step_overhead import SLOTS, decode_configs

MISS_FIRST_SLOT = 16  # step_overhead loads LoRA into slots 0..15 and MiSS into 16..31


def test_each_config_uses_the_adapter_count_in_its_name() -> None:
    for name, slots in decode_configs().items():
        assert len(slots) == 32, name
        assert all(-1 <= s < SLOTS for s in slots), name
        if name == "base":
            assert set(slots) == {-1}
            continue
        count = int(re.match(r"[a-z]+(\d+)", name).group(1))
        assert len(set(slots)) == count, f"{name}: {len(set(slots))} distinct slots"


def test_mix_is_half_lora_half_miss_in_requests_and_adapters() -> None:
    for name in ("mix16", "mix16_f16"):
        slots = decode_configs()[name]
        miss = [s for s in slots if s >= MISS_FIRST_SLOT]
        assert len(miss) == len(slots) // 2
        assert len(set(miss)) == len(set(slots)) // 2
