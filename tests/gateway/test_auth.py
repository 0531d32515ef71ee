"""API key parsing: pure logic (the gateway's own tests start it with real keys files)."""

from __future__ import annotations

import pytest

from posemesh.gateway.auth import KeyConfigError, parse_keys


def test_commas_and_lines_separate_entries():
    assert parse_keys("alice:k1,bob:k2\ncarol:k3") == {"k1": "alice", "k2": "bob", "k3": "carol"}


def test_no_text_of_a_comment_becomes_a_key():
    text = "# replace me, e.g. alice:<key>, bob:<key>\nalice:real-key  # alice's, rotated 2026\n"
    assert parse_keys(text) == {"real-key": "alice"}


def test_a_malformed_entry_stops_the_start_without_echoing_it():
    with pytest.raises(KeyConfigError) as err:
        parse_keys("alice:k1,secret-without-user")
    assert "secret-without-user" not in str(err.value)
