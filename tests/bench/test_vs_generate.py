"""bench.vs_generate serves the same requests on the engine and through transformers' generate and prints the row."""

from __future__ import annotations

from bench import vs_generate


def test_quick_row(capsys, embedded_model_dir):
    vs_generate.main(["--quick"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line
            and "engine" not in line]
    assert len(rows) == 1
    ours, theirs, ratio = (float(c.strip().rstrip("x")) for c in rows[0].split("|")[1:4])
    assert ours > 0 and theirs > 0 and ratio > 0
