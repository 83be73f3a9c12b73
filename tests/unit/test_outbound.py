"""Outbound requests to user-given URLs (infra/outbound.py): which addresses are refused, however
spelt, and that the connection itself re-checks (DNS rebinding). No test here sends a packet:
names resolve through the test's own table and connections are recorded instead of made."""

from __future__ import annotations

import httpcore
import httpx
import pytest

from infra.outbound import AddressPolicy, BlockedAddress, guarded_client, literal_address


class Table:
    """A resolver of the test's own: each name's answers, the next one per lookup."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answers = self.answers.get(host)
        if not answers:
            raise OSError(f"no such host {host!r}")
        return answers.pop(0) if len(answers) > 1 else answers[0]


class Recorder(httpcore.AsyncNetworkBackend):
    """Records where a connection would go, and makes none."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(
        self, host: str, port: int, *args: object, **kwargs: object
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        raise httpcore.ConnectError("recorded, not connected")

    async def sleep(self, seconds: float) -> None:
        return None


NOT_GLOBAL = [
    "127.0.0.1", "2130706433", "0x7f.1", "127.1", "0177.0.0.1", "017700000001", "0x7f000001", "localhost.",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "0", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "169.254.169.254", "[fd00:ec2::254]", "100.100.100.200", "224.0.0.1", "[ff02::1]", "[fe80::1]",
    "[2002:7f00:1::]", "[64:ff9b::a00:1]", "255.255.255.255", "192.0.2.1", "192.0.0.1", "[fec0::1]",
    "[::127.0.0.1]", "[64:ff9b:1::a00:1]",
]  # fmt: skip


@pytest.mark.parametrize("host", NOT_GLOBAL)
async def test_every_spelling_of_a_non_global_address_is_refused(host: str) -> None:
    policy = AddressPolicy(resolver=Table({"localhost.": [["127.0.0.1"]]}))
    with pytest.raises(BlockedAddress):
        await policy.addresses(host, 80)


def test_numeric_hosts_are_read_as_the_c_library_reads_them() -> None:
    assert {str(literal_address(h)) for h in ("2130706433", "0x7f.1", "127.1", "0177.0.0.1")} == {"127.0.0.1"}
    assert literal_address("example.com") is None and literal_address("deadbeef") is None


async def test_a_name_is_refused_if_any_of_its_addresses_is_not_global() -> None:
    policy = AddressPolicy(
        resolver=Table({"inside.test": [["10.0.0.5"]], "mixed.test": [["93.184.216.34", "10.0.0.5"]]})
    )
    refused = []
    for name in ("inside.test", "mixed.test", "nowhere.test"):
        with pytest.raises(BlockedAddress) as caught:
            await policy.check_url(f"https://{name}/hook")
        refused.append(caught.value)
    # the caller learns neither whether it resolved nor where to; the operator's log does
    assert [str(e) for e in refused] == [f"host {n!r} does not resolve to public addresses only"
                                         for n in ("inside.test", "mixed.test", "nowhere.test")]  # fmt: skip
    assert "10.0.0.5, a private address" in refused[0].detail and "does not resolve" in refused[2].detail


async def test_a_name_that_resolves_elsewhere_at_delivery_is_refused_before_any_connection() -> None:
    """DNS rebinding: public when given, private when connected to."""
    table = Table({"rebind.test": [["93.184.216.34"], ["10.0.0.5"]]})
    policy = AddressPolicy(resolver=table)
    await policy.check_url("http://rebind.test/hook")  # accepted when given
    recorder = Recorder()
    async with guarded_client(policy, 5.0, inner=recorder) as client:
        with pytest.raises(BlockedAddress) as caught:
            await client.post("http://rebind.test/hook", content=b"{}")
    assert "10.0.0.5" in caught.value.detail
    assert recorder.connects == [] and table.asked == ["rebind.test", "rebind.test"]


async def test_the_connection_goes_to_the_address_that_was_checked() -> None:
    recorder = Recorder()
    policy = AddressPolicy(resolver=Table({"public.test": [["93.184.216.34"]]}))
    async with guarded_client(policy, 5.0, inner=recorder) as client:
        with pytest.raises(httpx.ConnectError, match="recorded, not connected"):
            await client.post("https://public.test:8443/hook", content=b"{}")
        for url in ("http://[::1]/hook", "http://2130706433/hook", "http://0x7f.1:8080/hook"):
            with pytest.raises(BlockedAddress, match="loopback"):
                await client.post(url, content=b"{}")
    assert recorder.connects == [("93.184.216.34", 8443)]


async def test_an_operators_named_hosts_are_reached_as_spelt_and_no_other_spelling() -> None:
    policy = AddressPolicy(
        ["127.0.0.1", "hooks.internal"], resolver=Table({"hooks.internal": [["10.0.0.9"]]})
    )
    assert await policy.addresses("127.0.0.1", 80) == ["127.0.0.1"]
    assert await policy.addresses("hooks.internal", 80) == ["10.0.0.9"]
    for other in ("127.1", "2130706433", "[::1]"):
        with pytest.raises(BlockedAddress):
            await policy.addresses(other, 80)
