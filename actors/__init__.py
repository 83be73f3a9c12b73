"""Dramatiq actors, their broker and the worker's runtime.

`actors.evaluate` declares the evaluation actors (building the broker on import) and
`actors.maintenance` the scheduled ones; `crucible worker` runs both with Dramatiq's CLI and
`crucible scheduler` sends the scheduled ones with periodiq.
"""
