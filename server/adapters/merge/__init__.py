"""Merged copies of the base: folding one adapter into a dedicated copy and undoing it."""
