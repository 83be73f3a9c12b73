"""Binaries of successful compile steps, kept by toolchain and source, so a program compiled
once (a benchmark judging many samples against the same harness, a resubmission) runs without
compiling again.

The key is a hash of the language, its compiler's version line, the compile command and the
source: a different toolchain or flag never reuses a binary. Only a compile that exited 0 in
time is kept (its warnings are not part of any answer). Least recently used binaries go first
once the cache holds `max_bytes`. A cache hit is faster than a compile, so a caller could tell
whether this executor compiled the very same source recently; nothing else of it shows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from evaluations.languages import Language


class CompileCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._binaries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._binaries)

    @staticmethod
    def key(language: Language, source: bytes, files: list[tuple[str, bytes]] | None = None) -> str:
        """The binary's name: the toolchain, the source and the files beside it (headers)."""
        digest = hashlib.sha256()
        for part in (language.name, language.version, "\0".join(language.compile or ())):
            digest.update(part.encode() + b"\0")
        digest.update(source)
        for name, content in files or ():
            digest.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(content).digest())
        return digest.hexdigest()

    def get(self, key: str) -> bytes | None:
        binary = self._binaries.get(key)
        if binary is not None:
            self._binaries.move_to_end(key)
            self.hits += 1
        return binary

    def put(self, key: str, binary: bytes) -> None:
        if len(binary) > self.max_bytes or key in self._binaries:
            return
        self._binaries[key] = binary
        self._bytes += len(binary)
        while self._bytes > self.max_bytes:
            _, dropped = self._binaries.popitem(last=False)
            self._bytes -= len(dropped)
