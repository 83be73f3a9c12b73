"""HTTP API, CLI and shared plumbing (configuration, logging, storage)."""
