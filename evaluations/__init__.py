"""Crucible's domain core: the evaluation record, its statuses and their transition table, the
store and its Lua scripts, Redis key names, the queue protocol and its encoding, Celery's wire
format, quotas, API keys, languages, domain exceptions and field checks. It imports nothing
of Crucible's (docs/architecture.md); how processes are built lives in `infra`."""
