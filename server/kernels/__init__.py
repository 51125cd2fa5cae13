"""Compiled fast paths beside the pure-torch reference (each one optional)."""
