"""End-to-end tests: real Redis (embedded Valkey or REDIS_URL), real executors and sandboxes, real
API and worker processes, the real Celery client."""
