from __future__ import annotations

import re
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus import InvalidSessionIdError, Keys, check_session_id, check_worker_id

session_ids = st.text(
    st.characters(blacklist_categories=("Zs", "Cc", "Cs"), blacklist_characters="{}\n\r\t"),
    min_size=1,
    max_size=200,
)


@given(session_ids, st.integers(1, 1024))
def test_every_key_of_a_session_shares_its_partition_hash_tag(
    session: str, partitions: int
) -> None:
    keys = Keys("fb", partitions)
    p = keys.partition(session)
    assert 0 <= p < partitions and p == zlib.crc32(session.encode()) % partitions
    tag = f"fb:{{{p}}}:"
    for key in (
        keys.session(session),
        keys.inbox(session),
        keys.meta(session),
        keys.sent(session),
        keys.state(session),
        keys.wake(p),
        keys.live(p),
        keys.ended(p),
        keys.dead(p),
        keys.lease(p, "g"),
        keys.epoch(p, "g"),
        keys.paused(p, "g"),
    ):
        assert key.startswith(tag)
        assert key.index("{") == len("fb:")  # the first brace pair is the cluster hash tag


def test_the_documented_names() -> None:
    keys = Keys("flowbus", 64)
    p = keys.partition("call-42")
    assert keys.session("call-42") == f"flowbus:{{{p}}}:session:call-42"
    assert keys.inbox("call-42") == f"flowbus:{{{p}}}:session:call-42:inbox"
    assert keys.consumer(17) == "p17"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "it is empty"),
        ("a b", "whitespace"),
        ("a{b}", "braces"),
        ("x" * 201, "longer than 200"),
        ("tab\there", "whitespace"),
        ("nul\x00byte", "control characters"),
        ("esc\x1b[31m", "control characters"),
        ("call-1:inbox", "may not end in :inbox"),
        ("call-1:meta", "may not end in"),
        ("call-1:state", "may not end in"),
        ("call-1:sent", "may not end in"),
    ],
)
def test_unusable_session_ids_are_refused_with_the_reason(bad: str, reason: str) -> None:
    with pytest.raises(InvalidSessionIdError, match=f"invalid session id .*{re.escape(reason)}"):
        check_session_id(bad)


def test_a_session_id_may_hold_colons_that_name_no_key_of_another() -> None:
    assert check_session_id("sip:call-1@example.com") == "sip:call-1@example.com"
    assert check_session_id("call-1:inbox-2") == "call-1:inbox-2"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [("", "empty"), ("w 1", "whitespace"), ("w{1}", "braces"), ("w" * 201, "longer than 200")],
)
def test_unusable_worker_ids_are_refused_with_the_reason(bad: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"invalid worker id.*{reason}"):
        check_worker_id(bad)
    assert check_worker_id("host-7.example:2") == "host-7.example:2"


@pytest.mark.parametrize("bad", [42, b"call-1", None])
def test_a_session_id_that_is_not_a_string_is_refused(bad: object) -> None:
    with pytest.raises(InvalidSessionIdError, match="it must be a string"):
        check_session_id(bad)  # type: ignore[arg-type]
