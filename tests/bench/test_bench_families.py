"""bench.families runs a family end to end and prints its row."""

from __future__ import annotations

from bench import families


def test_one_family_row(capsys, embedded_model_dir, monkeypatch):
    monkeypatch.setattr(families, "ADAPTERS", 2)
    families.main(["--quick", "--families", "gemma2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| Gemma 2 |")]
    assert len(rows) == 1
    base, adapted = (float(c) for c in rows[0].split("|")[3:5])
    assert base > 0 and adapted > 0
