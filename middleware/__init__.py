"""Crucible's Dramatiq middleware: each a small class with hooks, like Dramatiq's own."""
