"""check_url: hostile URLs refused for the right reason, legitimate ones normalised."""

from __future__ import annotations

import ipaddress
import re

import pytest

from common.webhooks.ssrf import (
    MAX_URL_LENGTH,
    CheckedURL,
    UnsafeURL,
    check_url,
    parse_allow_hosts,
    unsafe_address_reason,
)
from tests.fixtures.hostile_urls import HOSTILE_URLS, HostileURL, etc_hosts_loopback_names
from tests.unit.webhooks.conftest import FakeDNS


def test_the_hostile_list_is_big_enough() -> None:
    assert len(HOSTILE_URLS) >= 45
    assert len({h.template for h in HOSTILE_URLS}) == len(HOSTILE_URLS)


@pytest.mark.parametrize("hostile", HOSTILE_URLS, ids=lambda h: h.note)
def test_hostile_url_refused_with_reason(hostile: HostileURL) -> None:
    with pytest.raises(UnsafeURL) as info:
        check_url(hostile.url)
    message = str(info.value)
    assert hostile.expect in message, message
    assert isinstance(info.value, ValueError)
    assert info.value.reason in message


@pytest.mark.parametrize("name", etc_hosts_loopback_names() or ["localhost"])
def test_etc_hosts_names_resolving_to_loopback_refused(name: str) -> None:
    with pytest.raises(UnsafeURL, match=r"resolves to .*loopback"):
        check_url(f"https://{name}/hook")


def test_message_names_the_address() -> None:
    with pytest.raises(UnsafeURL) as info:
        check_url("https://localhost/hook")
    assert "resolves to a loopback address" in str(info.value)
    assert "127.0.0.1" not in str(info.value)  # the internal address is not revealed
    with pytest.raises(UnsafeURL) as info:
        check_url("https://0x7f.1/")
    assert "127.0.0.1" in str(info.value)
    assert "loopback" in str(info.value)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("https://93.184.216.34/hook", "93.184.216.34"),
        ("https://[2606:4700::1111]/x", "2606:4700::1111"),
        ("https://1.1.1.1:8443/a?b=c", "1.1.1.1"),
        ("https://[::ffff:8.8.8.8]/", "8.8.8.8"),
        ("https://[64:ff9b::808:808]/", "64:ff9b::808:808"),
    ],
)
def test_public_ip_literals_accepted_without_dns(url: str, address: str) -> None:
    checked = check_url(url, resolve=True)
    assert checked.addresses == [address]
    assert checked.scheme == "https"


def test_normalisation() -> None:
    checked = check_url("HTTPS://Hooks.Example.COM.:443/a/b?x=1#frag", resolve=False)
    assert checked == CheckedURL(
        url="https://hooks.example.com/a/b?x=1",
        scheme="https",
        host="hooks.example.com",
        port=443,
        path_and_query="/a/b?x=1",
        addresses=[],
    )
    assert checked.host_header == "hooks.example.com"
    assert check_url("https://example.com?q", resolve=False).path_and_query == "/?q"
    assert check_url("https://bücher.de/", resolve=False).host == "xn--bcher-kva.de"
    literal = check_url("https://[2606:4700::1111]:8443/x")
    assert literal.url == "https://[2606:4700::1111]:8443/x"
    assert literal.host_header == "[2606:4700::1111]:8443"


@pytest.mark.parametrize(
    "short",
    [
        "https://1.1?",  # the host becomes 1.0.0.1 and the query gets a "/"
        "https://0x5db8d822/?",  # 93.184.216.34
        "https://bücher.de/?",  # xn--bcher-kva.de (resolve=False: no DNS)
    ],
)
def test_a_url_that_normalising_makes_too_long_is_refused(short: str) -> None:
    # Stored normalised in a 2048-character column: the limit applies to that form too.
    url = short + "a" * (MAX_URL_LENGTH - len(short))
    assert len(url) == MAX_URL_LENGTH
    with pytest.raises(UnsafeURL, match=r"characters long once normalised.*at most 2048"):
        check_url(url, resolve=False)
    shorter = url[: -(len(check_url(short, resolve=False).url) - len(short))]
    assert len(check_url(shorter, resolve=False).url) == MAX_URL_LENGTH


def test_allow_list_permits_loopback_and_http() -> None:
    allow = parse_allow_hosts("127.0.0.1,localhost")
    checked = check_url("http://127.0.0.1:8123/hook", allow)
    assert checked.addresses == ["127.0.0.1"]
    assert checked.allow_listed
    assert check_url("http://localhost:8123/", allow).addresses == ["127.0.0.1"]
    # Another spelling of the same allowed address is the same host.
    assert check_url("http://0x7f.1:8123/", allow).host == "127.0.0.1"
    # Without the list, the same URLs are refused.
    with pytest.raises(UnsafeURL):
        check_url("http://127.0.0.1:8123/hook")


def test_allow_list_is_exact(fake_dns: FakeDNS) -> None:
    fake_dns.add("other.example.test", ["127.0.0.1"])
    allow = parse_allow_hosts("127.0.0.1")
    with pytest.raises(UnsafeURL, match=re.escape("resolves to a loopback address")):
        check_url("https://other.example.test/", allow)
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url("https://127.0.0.2/", allow)
    with pytest.raises(UnsafeURL, match="user info"):
        check_url("http://user@127.0.0.1/", allow)


def test_parse_allow_hosts() -> None:
    assert parse_allow_hosts(" 127.0.0.1, LOCALHOST. ,[::1],::1,, ") == frozenset(
        {"127.0.0.1", "localhost", "::1"}
    )
    assert parse_allow_hosts("") == frozenset()
    assert parse_allow_hosts(["Example.com"]) == frozenset({"example.com"})
    with pytest.raises(ValueError, match="allow-list"):
        parse_allow_hosts("not a host")
    # check_url never raises anything but UnsafeURL, whatever the allow list holds.
    assert parse_allow_hosts("not a host,LocalHost", strict=False) == frozenset(
        {"not a host", "localhost"}
    )
    with pytest.raises(UnsafeURL):
        check_url("https://localhost/", frozenset({"not a host"}))
    assert check_url("http://localhost:1/", frozenset({"not a host", "localhost"})).allow_listed


def test_any_unsafe_resolved_address_refuses(fake_dns: FakeDNS) -> None:
    fake_dns.add("mixed.example.test", ["93.184.216.34", "10.1.2.3"])
    with pytest.raises(UnsafeURL, match=re.escape("resolves to a private address")):
        check_url("https://mixed.example.test/")
    fake_dns.add("v6.example.test", ["2606:4700::1111", "::1"])
    with pytest.raises(UnsafeURL, match=re.escape("resolves to a loopback address")):
        check_url("https://v6.example.test/")
    fake_dns.add("good.example.test", ["93.184.216.34", "2606:4700::1111"])
    checked = check_url("https://good.example.test/hook")
    assert checked.addresses == ["93.184.216.34", "2606:4700::1111"]


def test_unresolvable_host_refused_unless_resolution_is_off() -> None:
    with pytest.raises(UnsafeURL, match="could not be resolved"):
        check_url("https://does-not-exist.invalid/")
    assert check_url("https://does-not-exist.invalid/", resolve=False).addresses == []


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "metadata"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:a9fe:a9fe::", "metadata"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_unsafe_address_reason(address: str, reason: str | None) -> None:
    result = unsafe_address_reason(ipaddress.ip_address(address))
    if reason is None:
        assert result is None
    else:
        assert result is not None
        assert reason in result


def test_a_name_server_that_never_answers_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading
    import time

    from common.webhooks import ssrf

    answer = threading.Event()
    real = socket.getaddrinfo

    def hanging(host: str, *args: object, **kwargs: object) -> object:
        if host == "silent.example.test":
            answer.wait(10)  # the lookup cannot be interrupted; the caller stops waiting
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    monkeypatch.setattr(ssrf, "RESOLVE_TIMEOUT_SECONDS", 0.2)
    started = time.monotonic()
    try:
        with pytest.raises(UnsafeURL, match="could not be resolved"):
            check_url("https://silent.example.test/hook")
        assert time.monotonic() - started < 5
        # The silent name holds at most LOOKUPS_PER_HOST threads; beyond that it is refused at
        # once, and other names are still looked up.
        for _ in range(ssrf.LOOKUPS_PER_HOST):
            with pytest.raises(UnsafeURL, match="could not be resolved"):
                check_url("https://silent.example.test/hook")
        with pytest.raises(UnsafeURL, match="resolves to a loopback address"):
            check_url("https://localhost/hook")
    finally:
        answer.set()
