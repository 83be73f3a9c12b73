"""The doors into Crucible and what they share: the HTTP API (`api/`), the Celery
compatibility (`celery/`), the migration from the legacy deployment (`migration/`) and the CLI
(`cli/`), over the submission, cancel and status reading every door uses (modules here)."""
