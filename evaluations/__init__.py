"""Crucible's domain core: the evaluation record, its statuses and their transition table, the
store and its Lua scripts, Redis key names, the queue protocol, quotas, API keys, languages,
domain exceptions, and the plumbing every process shares (settings, logging, JSON, Redis
clients, the HTTP edge). It imports nothing of Crucible's above it (docs/architecture.md)."""
