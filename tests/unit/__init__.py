"""Fast tests: no processes, no Redis, no sandbox; the whole folder runs in seconds."""
