"""The network spec: rules are parsed data, hostile text is refused with a message naming it."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from forkyard.wire.network import DEFAULT_DENIED, MAX_RULES, NetworkMode, NetworkSpec


def test_rules_are_normalised_and_split_by_kind():
    s = NetworkSpec(allow_out=["10.1.2.3/8", " Example.COM. ", "*.pypi.org", "2001:db8::1"])
    assert s.mode is NetworkMode.OUTBOUND
    assert s.allow_out == ("10.0.0.0/8", "example.com", "*.pypi.org", "2001:db8::1/128")
    assert s.networks("allow_out") == [ipaddress.ip_network("10.0.0.0/8"),
                                       ipaddress.ip_network("2001:db8::1/128")]
    assert s.domains("allow_out") == ["example.com", "*.pypi.org"]
    assert NetworkSpec.model_validate(s.model_dump(mode="json")) == s


@pytest.mark.parametrize("bad", ["rm -rf /", "1.2.3", "a..b", "-x.com", "x" * 300, "",
                                 "10.0.0.0/33", "ex ample.com", "{{x}}", "a.com;drop"])
def test_hostile_rules_are_refused_naming_the_rule(bad):
    with pytest.raises(ValidationError) as info:
        NetworkSpec(deny_out=[bad])
    assert "egress rule" in str(info.value) or "at most" in str(info.value)


def test_rule_lists_are_bounded_and_unknown_fields_refused():
    with pytest.raises(ValidationError):
        NetworkSpec(allow_out=["1.1.1.1"] * (MAX_RULES + 1))
    with pytest.raises(ValidationError):
        NetworkSpec.model_validate({"mode": "bridge"})
    with pytest.raises(ValidationError):
        NetworkSpec.model_validate({"mode": "none", "allow": []})


def test_default_denied_covers_private_and_metadata_ranges():
    nets = [ipaddress.ip_network(n) for n in DEFAULT_DENIED]
    for addr in ["10.1.1.1", "172.20.0.1", "192.168.1.1", "169.254.169.254", "127.0.0.1",
                 "100.64.0.1", "fd00::1", "fe80::1", "::1"]:
        a = ipaddress.ip_address(addr)
        assert any(a in n for n in nets if n.version == a.version), addr
    assert not any(ipaddress.ip_address("203.0.113.7") in n for n in nets if n.version == 4)
