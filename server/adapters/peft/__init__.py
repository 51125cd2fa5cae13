"""PEFT adapter files: parse, validate and carve them into compute form; no storage, no residency."""
