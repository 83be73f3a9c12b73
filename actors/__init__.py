"""Dramatiq actors, their broker and the worker's runtime.

`actors.evaluate` declares the actors (building the broker on import); `dramatiq actors.evaluate`
runs them, which is what `crucible worker` does.
"""
