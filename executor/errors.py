"""The sandbox's failures a caller tells apart: no free slot (try elsewhere), or a sandbox that
did not start (ours, never the submission's)."""

from __future__ import annotations


class SandboxBusy(Exception):
    """Every run slot is taken; the caller should try another executor or wait."""


class SandboxError(Exception):
    """The sandbox itself failed to start: our fault, never the submission's."""
