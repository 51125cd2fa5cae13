"""bench.decoding runs every decoding-feature configuration on the real engine and prints its ratio row."""

from __future__ import annotations

from bench import decoding


def test_quick_rows(capsys, embedded_model_dir):
    decoding.main(["--quick"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| config", "| ---"))}
    assert set(rows) == {"plain greedy", "logprobs (top 5)", "n=4 (seeded sampling)", "JSON schema on half"}
    for rate, ratio in rows.values():
        assert float(rate) > 0 and float(ratio.strip().rstrip("x")) > 0
