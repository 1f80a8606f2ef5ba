from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus import InvalidSessionIdError, Keys, check_session_id

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


@pytest.mark.parametrize("bad", ["", "a b", "a{b}", "x" * 201, "tab\there"])
def test_unusable_session_ids_are_refused_with_the_reason(bad: str) -> None:
    with pytest.raises(InvalidSessionIdError, match="invalid session id"):
        check_session_id(bad)
