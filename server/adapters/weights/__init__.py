"""Adapter weights in compute form (LoRA, MiSS, a loaded adapter): plain tensors, importing nothing else here."""
