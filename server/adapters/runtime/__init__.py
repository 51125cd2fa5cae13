"""The batched runtime: per-step plans, slot banks, adapted layers and the backends that add adapter terms."""
