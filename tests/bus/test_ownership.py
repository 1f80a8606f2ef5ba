from __future__ import annotations

from random import Random

from hypothesis import given
from hypothesis import strategies as st

from bus.ownership import assign

members = st.lists(
    st.text("abcdef0123456789-", min_size=1, max_size=12), min_size=1, max_size=12, unique=True
)


@given(members, st.integers(1, 256))
def test_every_partition_has_one_owner_and_loads_differ_by_at_most_one(
    names: list[str], partitions: int
) -> None:
    result = assign(sorted(names), partitions)
    owned = [p for ps in result.values() for p in ps]
    assert sorted(owned) == list(range(partitions))
    loads = [len(ps) for ps in result.values()]
    assert max(loads) - min(loads) <= 1


@given(members, st.integers(1, 256), st.randoms(use_true_random=False))
def test_the_assignment_depends_only_on_the_member_set(
    names: list[str], partitions: int, random: Random
) -> None:
    shuffled = random.sample(names, len(names))
    assert assign(names, partitions) == assign(shuffled, partitions)
    assert assign(names, partitions) == assign(list(reversed(names)), partitions)


def test_a_joining_member_moves_few_partitions() -> None:
    before = assign([f"w{i}" for i in range(4)], 64)
    after = assign([f"w{i}" for i in range(5)], 64)
    moved = sum(len(before[m] - after[m]) for m in before)
    assert len(after["w4"]) >= 12
    assert moved <= 64 // 2  # round-robin would move ~80%
