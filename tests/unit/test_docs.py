"""The docs match the code: every setting is documented, links lead somewhere, and README.md's
first screen is what a new user needs (what it is, the two commands, how to try it)."""

from __future__ import annotations

import re

from bench.stack import ROOT

README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
#: What fits on a first screen.
FIRST_SCREEN_LINES = 45


def settings_read() -> set[str]:
    """Every environment variable `infra/settings.py` reads."""
    source = (ROOT / "infra" / "settings.py").read_text()
    return set(re.findall(r'(?:_\w+|environ\.get)\(\s*"([A-Z][A-Z0-9_]+)"', source))


def test_every_setting_the_code_reads_is_in_the_configuration_table() -> None:
    names = settings_read()
    assert len(names) > 40  # the pattern still finds them
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", CONFIGURATION))
    assert names - documented == set()


def test_the_first_screen_says_what_it_is_the_two_commands_and_how_to_try_it() -> None:
    first = "\n".join(README.splitlines()[:FIRST_SCREEN_LINES])
    assert "./dev up" in first and "./dev test" in first and "minutes" in first
    assert "## Try it" in first and "./dev submit" in first
    assert "| variable |" not in README and "| endpoint |" not in README  # the long tables are in docs/


def test_relative_links_lead_to_files_that_exist() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
