from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus import Codec, DecodeError, Entry, Payload, encode, type_name


class Greeted(Payload, tag="greeted"):
    name: str
    times: int = 1


class Left(Payload, tag="left"):
    reason: str | None = None


CODEC = Codec([Greeted, Left])


def test_a_payload_round_trips_with_its_type_inside_the_json() -> None:
    data = encode(Greeted(name="ada"))
    assert msgspec.json.decode(data) == {"type": "greeted", "name": "ada", "times": 1}
    assert CODEC.decode("greeted", data) == Greeted(name="ada")
    assert type_name(Left) == "left" and "left" in CODEC and "nope" not in CODEC


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("nope", b"{}", "unknown type 'nope'"),
        ("greeted", b"{", "invalid data for 'greeted': Input data was truncated"),
        ("greeted", b'{"type":"greeted"}', "Object missing required field `name`"),
        ("greeted", b'{"type":"left"}', "field type is 'greeted' but data is 'left'"),
        ("greeted", b'{"type":"greeted","name":3}', "Expected `str`, got `int`"),
    ],
)
def test_decoding_validates_and_says_why(name: str, data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(name, data)
    assert reason in caught.value.reason


def test_two_types_cannot_claim_one_wire_name() -> None:
    class Other(Payload, tag="greeted"):
        pass

    with pytest.raises(ValueError, match="greeted"):
        Codec([Greeted, Other])


def test_codecs_combine() -> None:
    assert set((Codec([Greeted]) | Codec([Left])).types) == {"greeted", "left"}


def test_entry_parse_checks_the_envelope() -> None:
    raw = {b"type": b"left", b"seq": b"3", b"ts": b"17", b"data": b"{}", b"traceparent": b"00-x"}
    entry = Entry.parse("1-0", raw, max_data=10)
    assert (entry.type, entry.seq, entry.ts, entry.extra) == (
        "left",
        3,
        17,
        {"traceparent": "00-x"},
    )
    with pytest.raises(DecodeError, match="the limit is 1"):
        Entry.parse("1-0", raw, max_data=1)
    with pytest.raises(DecodeError, match="missing field"):
        Entry.parse("1-0", {b"type": b"left"}, max_data=10)


_FIELD = st.sampled_from([b"type", b"seq", b"ts", b"data", b"traceparent", b"\xff", b"x"])
_VALUE = st.sampled_from([b"left", b"3", b"-1", b"17", b"{}", b"", b"\xff\xfe", b"1e3", b" 4"])


@given(
    st.one_of(
        st.tuples(_VALUE, _VALUE, _VALUE, _VALUE).map(
            lambda v: [b"type", v[0], b"seq", v[1], b"ts", v[2], b"data", v[3]]
        ),  # the publisher's layout, with any values
        st.lists(st.tuples(_FIELD, _VALUE), max_size=6).map(
            lambda pairs: [x for pair in pairs for x in pair]
        ),
    ),
    st.integers(min_value=0, max_value=4),
)
def test_entry_from_a_flat_field_list_is_what_parse_says(raw: list[bytes], limit: int) -> None:
    pairs = iter(raw)
    fields = dict(zip(pairs, pairs, strict=False))
    try:
        expected: Entry | str = Entry.parse("1-0", fields, max_data=limit)
    except DecodeError as exc:
        expected = str(exc)
    try:
        got: Entry | str = Entry.from_flat("1-0", raw, max_data=limit)
    except DecodeError as exc:
        got = str(exc)
    assert got == expected


@pytest.mark.parametrize("seq", [b"012", b"+3", b"1_0", b"3.0", b"3x", b""])
def test_seq_and_ts_are_integers_as_json_writes_them(seq: bytes) -> None:
    flat = [b"type", b"left", b"seq", seq, b"ts", b"17", b"data", b"{}"]
    with pytest.raises(DecodeError, match="malformed"):
        Entry.from_flat("1-0", flat, max_data=10)
    assert Entry.from_flat("1-0", [*flat[:3], b"3", *flat[4:]], max_data=10).seq == 3
