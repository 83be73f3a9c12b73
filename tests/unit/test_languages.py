"""The registry offers only toolchains whose real files are under /usr, named by those files."""

from __future__ import annotations

import os
from pathlib import Path

from evaluations.languages import BINARY, HEAP_MB, RUN_BINARY, jvm_heap_mb, registry, usr_program

OFFERED = registry("/usr/bin/python3")


def test_a_link_from_outside_usr_is_followed_and_a_program_outside_usr_is_refused(tmp_path: Path) -> None:
    # as /usr/bin/java → /etc/alternatives/java → /usr/lib/jvm/.../bin/java
    (tmp_path / "alternative").symlink_to("/usr/bin/env")
    assert usr_program(str(tmp_path / "alternative")) == os.path.realpath("/usr/bin/env")
    # as a rustup toolchain in a home folder: never offered, whatever links to it
    own = tmp_path / "rustc"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    (tmp_path / "link").symlink_to(own)
    assert usr_program(str(own)) is None and usr_program(str(tmp_path / "link")) is None
    assert usr_program("/usr/local/bin/anything") is None  # hidden in the sandbox
    assert usr_program("/usr/bin/no-such-program") is None


def test_every_program_a_language_names_is_its_real_file_under_usr() -> None:
    assert {"python", "bash", "c", "cpp"} <= set(OFFERED)
    for language in OFFERED.values():
        for argv in (language.run, language.compile or ()):
            program = argv[0] if argv else None
            if program in (None, RUN_BINARY, "/bin/sh"):  # the binary; the sandbox's own shell
                continue
            assert usr_program(program) == program, (language.name, program)


def test_java_is_sized_to_its_memory_limit_and_binds_only_its_configuration() -> None:
    java = OFFERED.get("java")
    if java is None:  # no JDK under /usr here: not offered (the e2e tests require it)
        return
    assert f"-Xmx{jvm_heap_mb(512)}m" in java.run_argv(512) and HEAP_MB not in "".join(java.run_argv(512))
    assert f"-J-Xmx{jvm_heap_mb(1024)}m" in java.compile_argv(1024)[2]
    assert java.run[-2:] == ("-jar", RUN_BINARY) and BINARY in java.compile_argv(1024)[2]
    # Debian's JDK links its configuration into /etc/java-<N>-openjdk: that folder alone
    assert all(folder.startswith("/etc/") and folder.count("/") == 2 for folder in java.host_dirs)
    assert [jvm_heap_mb(mb) for mb in (16, 128, 512)] == [8, 64, 448]
