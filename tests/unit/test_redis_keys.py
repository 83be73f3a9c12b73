"""Every Redis key name is spelled once, in evaluations/redis_keys.py; the Lua scripts build the
same names from the namespace they are given."""

from __future__ import annotations

import inspect
import re

from evaluations.redis_keys import RedisKeys
from tests.unit.import_graph import ROOT, modules

LUA_SCRIPTS = [*ROOT.glob("evaluations/lua/*.lua"), *ROOT.glob("actors/lua/*.lua")]


def every_name(keys: RedisKeys, argument: str = "x") -> set[str]:
    """Each key name RedisKeys can make, with `argument` for any argument."""
    names = set()
    for attr, _ in inspect.getmembers(type(keys)):
        if attr.startswith("_") or attr in ("ns", "everything"):
            continue
        value = getattr(keys, attr)
        names.add(value(argument) if callable(value) else value)
    return names


def known(lua_name: str, names: set[str]) -> bool:
    """A name a script builds is RedisKeys's, or starts with a name RedisKeys takes an argument for."""
    return any(lua_name == n or ("\0" in n and lua_name.startswith(n.split("\0")[0])) for n in names)


def test_every_key_a_lua_script_builds_is_one_redis_keys_names() -> None:
    names = every_name(RedisKeys("NS"), argument="\0")
    used = {
        (script.name, suffix)
        for script in LUA_SCRIPTS
        for suffix in re.findall(r'ns \.\. "(:[\w:]+)"', script.read_text())
    }
    assert len(used) > 20  # the pattern does find them
    unknown = {(script, suffix) for script, suffix in used if not known(f"NS{suffix}", names)}
    assert unknown == set()


def test_no_python_module_spells_a_key_name_itself() -> None:
    spelled = re.compile(r'f"\{[\w.]*(?:ns|namespace)\}:')
    offenders = [
        name
        for name, path in modules().items()
        if name != "evaluations.redis_keys" and spelled.search(path.read_text())
    ]
    assert offenders == []


def test_namespaces_keep_stacks_apart() -> None:
    one, two = every_name(RedisKeys("one")), every_name(RedisKeys("two"))
    assert all(n.startswith("one:") for n in one) and not one & two
