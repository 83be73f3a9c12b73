"""Dramatiq actors, their broker and the worker's runtime.

`actors.evaluate` and `actors.maintenance` hold the actors' functions; `actors.worker` builds
the broker and declares them (`crucible worker` runs Dramatiq's CLI on `actors.worker:main`,
`crucible scheduler` periodiq on the same).
"""
