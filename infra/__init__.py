"""How Crucible's processes are built, beside what an evaluation is: settings, logging, Redis
clients, GC tuning, Redis memory watching and the HTTP edge both services share (errors to
status codes, bodies, credentials, header deadlines). It stands on the domain (`evaluations`)
and on nothing else of ours (docs/architecture.md)."""
