"""Adapter storage: versioned records published atomically, in a local directory or a shared S3 bucket."""
