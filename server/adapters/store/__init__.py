"""Adapter storage on disk: versioned records, the publish lock, atomic file writes."""
