"""The object directory's decisions (coordinator/objects.py), without a network: puts, reads that
form chains, locality, faults, memory, tombstones, readiness; and a property test that runs random
operations against an independent model and checks the chains' invariants after every step."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collcomm.coordinator import objects as ob
from collcomm.coordinator.objects import (DELETED, ENTRY_OVERHEAD, EXISTS, FULL, LOST, NOT_FOUND, Holder, Info,
                                          Meta, ObjectDirectory, Source)
from collcomm.coordinator.state import INVALID, MAX_KEY_LENGTH, Refusal, Waiting

pytestmark = pytest.mark.timeout(60)

BIG = Meta(1 << 20, "uint8", (1 << 20,))


def H(rank: int, host: str = "", box: str = "") -> Holder:
    return Holder(rank, f"10.0.0.1:{4000 + rank}", host, box)


def src(found) -> int:
    """The rank a locate answer names as the source."""
    assert isinstance(found, Source) and found.source is not None, found
    return found.source.holder.rank


def table(d: ObjectDirectory, key: str) -> dict[int, tuple[bool, int | None, int]]:
    """rank -> (complete, parent, children), from the public info."""
    info = d.info(key)
    assert isinstance(info, Info), info
    return {l.holder.rank: (l.complete, l.parent, l.children) for l in info.locations}


def parents(d: ObjectDirectory, key: str) -> dict[int, int | None]:
    return {r: p for r, (_, p, _) in table(d, key).items()}


def brute_used(d: ObjectDirectory) -> int:
    total = 0
    for key in list(d._entries):
        info = d.info(key)
        total += ENTRY_OVERHEAD * (1 + len(info.locations)) + (len(info.inline) if info.inline is not None else 0)
    return total


def check_chains(d: ObjectDirectory) -> None:
    """What must hold of every key at any time: a location's ``children`` is the number of
    locations whose parent it is (more than one only for readers from other boxes: see
    test_one_box_keeps_chains), the parent pointers form no cycle, and
    ``used`` is the sum of the costs. (The property test checks the parents themselves against
    its model: a parent is None, or a live location of the key that counts the reader, or, for an
    orphan whose source's copy was dropped, that dropped rank for as long as it holds no copy of
    the key again; the orphan's next locate or complete clears it.)"""
    for key in list(d._entries):
        t = table(d, key)
        for r, (_, _, children) in t.items():
            readers = sorted(x for x, (_, p, _) in t.items() if p == r)
            assert children == len(readers), \
                f"key {key!r}: rank {r} counts {children} readers, {readers} read from it: {t}"
        for r in t:
            seen, x = set(), r
            while x is not None and x in t:
                assert x not in seen, f"key {key!r}: a cycle of parents through rank {r}: {t}"
                seen.add(x)
                x = t[x][1]
    assert d.used == brute_used(d), (d.used, brute_used(d))


# -------------------------------------------------------------------------------- preference
def test_a_reader_prefers_its_host_then_its_box_then_elsewhere():
    """Three complete free copies: on the reader's host, in its box, in another box."""
    for order in ([1, 2, 3], [3, 2, 1]):
        d = ObjectDirectory()
        where = {1: H(1, "h0", "A"), 2: H(2, "h2", "A"), 3: H(3, "h3", "B")}
        for r in order:
            assert d.put("k", BIG, where[r], complete=True) is None if r == order[0] else \
                d.locate("k", where[r]) is not None and d.complete("k", r) is None
        reader = H(0, "h0", "A")
        assert src(d.locate("k", reader, register=False)) == 1
        assert d.abandon("k", 1) is None and src(d.locate("k", reader, register=False)) == 2
        assert d.abandon("k", 2) is None and src(d.locate("k", reader, register=False)) == 3


# -------------------------------------------------------------------------------- put, info
def test_a_put_registers_a_partial_copy_that_completes():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(3, "h", "A")) is None
    info = d.info("k")
    assert info.key == "k" and info.meta == BIG and info.inline is None and not info.complete
    assert [(l.holder, l.complete, l.parent, l.children) for l in info.locations] == [(H(3, "h", "A"), False, None, 0)]
    assert len(d) == 1 and d.used == 2 * ENTRY_OVERHEAD
    assert d.complete("k", 3) is None
    assert d.info("k").complete and table(d, "k") == {3: (True, None, 0)}


def test_a_complete_put_and_info_lists_locations_by_rank():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(5), complete=True) is None
    for r in (4, 1, 9):
        d.locate("k", H(r))
    assert [l.holder.rank for l in d.info("k").locations] == [1, 4, 5, 9]
    assert d.info("k").complete
    check_chains(d)


def test_inline_objects_live_in_the_directory():
    d = ObjectDirectory(inline_limit=16)
    meta = Meta(5, "uint8", (5,))
    assert d.put("small", meta, H(0), inline=b"hello") is None
    assert d.used == ENTRY_OVERHEAD + 5
    found = d.locate("small", H(7))
    assert isinstance(found, Source) and found.inline == b"hello" and found.source is None and found.meta == meta
    info = d.info("small")
    assert info.complete and info.inline == b"hello" and info.locations == ()  # the reader did not register
    assert d.put("empty", Meta(0, "uint8", (0,)), None, inline=b"") is None
    assert d.locate("empty", H(1)).inline == b""
    assert d.put("edge", Meta(16, "uint8", (16,)), None, inline=bytearray(16)) is None
    assert d.info("edge").inline == bytes(16)
    assert d.used == 3 * ENTRY_OVERHEAD + 5 + 16
    assert d.delete("small") == (True, ())
    check_chains(d)


def test_the_inline_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("COLLCOMM_OBJECT_INLINE_BYTES", raising=False)
    assert ob.inline_limit() == 64 << 10
    monkeypatch.setenv("COLLCOMM_OBJECT_INLINE_BYTES", " 4096 ")
    assert ob.inline_limit() == 4096
    for bad in ("-1", "1k", str((1 << 20) + 1)):
        monkeypatch.setenv("COLLCOMM_OBJECT_INLINE_BYTES", bad)
        with pytest.raises(ValueError, match="COLLCOMM_OBJECT_INLINE_BYTES"):
            ob.inline_limit()


def test_the_default_inline_limit_is_64_kib():
    d = ObjectDirectory()
    assert d.put("a", Meta(64 << 10, "uint8", (64 << 10,)), None, inline=bytes(64 << 10)) is None
    too_big = d.put("b", Meta((64 << 10) + 1, "uint8", ((64 << 10) + 1,)), None, inline=bytes((64 << 10) + 1))
    assert too_big.kind == INVALID


def test_a_key_put_twice_is_refused_and_nothing_changes():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    d.locate("k", H(1))
    before, used = table(d, "k"), d.used
    for again in (d.put("k", BIG, H(2)), d.put("k", BIG, H(0), complete=True),
                  d.put("k", Meta(3, "u8", (3,)), None, inline=b"abc")):
        assert again.kind == EXISTS and "'k'" in again.message
    assert table(d, "k") == before and d.used == used


@pytest.mark.parametrize("key", ["", "x" * (MAX_KEY_LENGTH + 1), None, 7, b"k"])
def test_malformed_keys_are_refused_everywhere(key):
    d = ObjectDirectory()
    assert d.put(key, BIG, H(0)).kind == INVALID
    assert d.locate(key, H(0)).kind == INVALID
    assert d.info(key).kind == INVALID
    assert d.delete(key).kind == INVALID
    assert d.ready(["fine", key]).kind == INVALID
    assert len(d) == 0 and d.used == 0


def test_the_longest_key_is_accepted():
    d = ObjectDirectory()
    key = "k" * MAX_KEY_LENGTH
    assert d.put(key, BIG, H(0)) is None and d.info(key).key == key


@pytest.mark.parametrize("meta, holder, inline, words", [
    (Meta(-1, "uint8", (1,)), H(0), None, "bad size"),
    (Meta(8, "uint8", (1,) * 33), H(0), None, "shape"),
    (Meta(8, "uint8", (2, -4)), H(0), None, "shape"),
    (Meta(4, "uint8", (4,)), None, b"abc", "3 inline bytes"),
    (Meta(3, "uint8", (3,)), None, b"abcd", "4 inline bytes"),
    (Meta(17, "uint8", (17,)), None, bytes(17), "inline limit 16"),
    (Meta(8, "uint8", (8,)), None, None, "neither bytes nor a holder"),
])
def test_malformed_objects_are_refused(meta, holder, inline, words):
    d = ObjectDirectory(inline_limit=16)
    refusal = d.put("k", meta, holder, inline=inline)
    assert isinstance(refusal, Refusal) and refusal.kind == INVALID and words in refusal.message
    assert isinstance(d.locate("k", H(5)), Waiting) and d.used == 0 and len(d) == 0


def test_32_dimensions_are_accepted():
    assert ObjectDirectory().put("k", Meta(1, "uint8", (1,) * 32), H(0)) is None


# ------------------------------------------------------------------------------------ memory
def test_a_put_past_the_bound_is_refused_and_nothing_stored_is_touched():
    d = ObjectDirectory(max_bytes=5 * ENTRY_OVERHEAD + 10, inline_limit=64)
    assert d.put("a", BIG, H(0), complete=True) is None                   # 2 x 512
    assert src(d.locate("a", H(1))) == 0                                  # + 512
    assert d.put("b", Meta(10, "u8", (10,)), None, inline=bytes(10)) is None  # 512 + 10
    assert d.used == d.max_bytes - ENTRY_OVERHEAD
    before = (table(d, "a"), d.info("b"), d.used)
    full = d.put("c", BIG, H(2))                                          # needs 2 x 512
    assert full.kind == FULL and str(d.max_bytes) in full.message and "'c'" in full.message
    assert d.put("c", Meta(1, "u8", (1,)), None, inline=b"x").kind == FULL  # 513: one byte too many
    assert (table(d, "a"), d.info("b"), d.used) == before
    assert isinstance(d.info("c"), Refusal) and isinstance(d.locate("c", H(0)), Waiting)
    assert d.put("c", Meta(0, "u8", (0,)), None, inline=b"") is None     # exactly at the bound
    assert d.used == d.max_bytes
    # a reader cannot register; one already there, or an inline read, needs nothing
    refused = d.locate("a", H(7))
    assert refused.kind == FULL and table(d, "a") == before[0] and d.used == d.max_bytes
    assert d.locate("c", H(7)).inline == b""
    assert src(d.locate("a", H(0))) == 0                                   # the complete holder itself
    assert d.delete("b")[0] and d.put("d", BIG, H(3)).kind == FULL         # 522 freed, 1024 needed
    assert d.delete("c")[0] and d.put("d", BIG, H(3)) is None              # room again
    check_chains(d)


def test_delete_gives_back_every_byte():
    d = ObjectDirectory(max_bytes=4 * ENTRY_OVERHEAD)
    assert d.put("a", BIG, H(0), complete=True) is None
    d.locate("a", H(1))
    d.locate("a", H(2))
    assert d.used == d.max_bytes
    existed, holders = d.delete("a")
    assert existed and sorted(h.rank for h in holders) == [0, 1, 2]
    assert d.used == 0 and len(d) == 0


# ------------------------------------------------------------------- delete, missing, tombstones
def test_a_deleted_key_is_refused_until_it_is_put_again():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    d.locate("k", H(1))
    assert d.delete("k")[0]
    for refusal in (d.locate("k", H(2)), d.info("k"), d.complete("k", 1), d.abandon("k", 1),
                    d.ready(["k", "other"])):
        assert isinstance(refusal, Refusal) and refusal.kind == DELETED and "'k'" in refusal.message
    assert d.delete("k") == (False, ())
    assert d.put("k", BIG, H(5)) is None                     # a put after a delete is allowed
    assert src(d.locate("k", H(6))) == 5 and table(d, "k") == {5: (False, None, 1), 6: (False, 5, 0)}
    assert d.delete("k")[0] and d.locate("k", H(2)).kind == DELETED


def test_a_key_not_put_yet_is_waited_for():
    d = ObjectDirectory()
    waiting = d.locate("later", H(0))
    assert isinstance(waiting, Waiting) and "'later'" in waiting.reason
    assert d.info("later").kind == NOT_FOUND
    assert d.complete("later", 0).kind == NOT_FOUND and d.abandon("later", 0).kind == NOT_FOUND
    assert d.delete("later") == (False, ())                  # no tombstone for a key never put
    assert isinstance(d.locate("later", H(0)), Waiting)
    assert d.put("later", BIG, H(1)) is None and src(d.locate("later", H(0))) == 1


def test_complete_and_abandon_of_a_rank_without_a_copy():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0)) is None
    refusal = d.complete("k", 4)
    assert refusal.kind == NOT_FOUND and "rank 4" in refusal.message
    used = d.used
    assert d.abandon("k", 4) is None and d.used == used and table(d, "k") == {0: (False, None, 0)}


def test_tombstones_are_bounded(monkeypatch):
    monkeypatch.setattr(ob, "TOMBSTONES", 2)
    d = ObjectDirectory()
    for k in ("a", "b", "c"):
        assert d.put(k, BIG, H(0)) is None and d.delete(k)[0]
    assert isinstance(d.locate("a", H(1)), Waiting)  # the oldest is forgotten
    assert d.locate("b", H(1)).kind == DELETED and d.locate("c", H(1)).kind == DELETED
    assert d.put("b", BIG, H(0)) is None and d.delete("b")[0]  # re-deleting refreshes it
    assert d.put("x", BIG, H(0)) is None and d.delete("x")[0]
    assert isinstance(d.info("c"), Refusal) and d.info("c").kind == NOT_FOUND
    assert d.info("b").kind == DELETED and d.info("x").kind == DELETED


# -------------------------------------------------------------------------------------- ready
def test_ready_returns_objects_as_more_than_known_exist():
    d = ObjectDirectory()
    keys = ["a", "b", "c"]
    waiting = d.ready(keys)
    assert isinstance(waiting, Waiting) and "3 of the objects 'a', 'b', 'c'" in waiting.reason
    assert d.put("b", BIG, H(1)) is None
    got = d.ready(keys)
    assert [i.key for i in got] == ["b"] and got[0] == d.info("b")
    assert isinstance(d.ready(keys, known=1), Waiting)
    assert d.put("a", Meta(2, "u8", (2,)), None, inline=b"hi") is None
    assert [i.key for i in d.ready(keys, known=1)] == ["a", "b"]  # in the order asked
    small = d.ready(keys, known=1)[0]
    assert small.inline == b"" and small.complete and small.meta.size == 2  # the bytes come with a locate
    assert d.info("a").inline == b"hi"
    assert d.put("c", BIG, H(2)) is None
    assert [i.key for i in d.ready(keys, known=3)] == keys  # all of them, whatever known says
    assert d.ready([]) == []
    assert d.delete("c")[0]
    assert d.ready(keys).kind == DELETED


def test_ready_names_at_most_four_missing_keys():
    waiting = ObjectDirectory().ready([f"k{i}" for i in range(7)])
    assert "'k3'" in waiting.reason and "'k4'" not in waiting.reason and "and 3 more" in waiting.reason


# ------------------------------------------------------------------------------------- chains
def test_readers_arriving_together_form_one_chain():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    tail = 0
    for r in range(1, 7):
        found = d.locate("k", H(r))
        assert src(found) == tail, (r, parents(d, "k"))
        assert found.source.children == 1 and found.meta == BIG
        tail = r
        check_chains(d)
    assert parents(d, "k") == {0: None, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5}
    assert [c for _, _, c in table(d, "k").values()] == [1, 1, 1, 1, 1, 1, 0]
    assert d.used == 8 * ENTRY_OVERHEAD


def test_a_partial_put_heads_a_chain():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(4)) is None
    assert [src(d.locate("k", H(r))) for r in (1, 2, 3)] == [4, 1, 2]
    assert not any(c for c, _, _ in table(d, "k").values())


def test_a_completed_reader_frees_its_source_for_a_short_chain():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    for r in (1, 2, 3, 4):
        d.locate("k", H(r))
    assert d.complete("k", 1) is None
    t = table(d, "k")
    assert t[0] == (True, None, 0) and t[1] == (True, None, 1)  # the source is free; 1 still feeds 2
    assert src(d.locate("k", H(5))) == 0                         # depth 1, not behind 4 at depth 4
    assert src(d.locate("k", H(6))) == 5                         # depth 2 beats the long chain's tail
    assert d.complete("k", 2) is None
    assert src(d.locate("k", H(7))) == 1                         # a complete copy freed by 2
    check_chains(d)


def test_ties_prefer_complete_copies_then_the_lower_rank():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0)) is None                         # partial, depth 0
    assert src(d.locate("k", H(9))) == 0
    assert d.complete("k", 9) is None                            # complete, depth 0; 0 is free again
    assert src(d.locate("k", H(5))) == 9                         # complete before partial
    d2 = ObjectDirectory()
    assert d2.put("k", BIG, H(8), complete=True) is None
    assert src(d2.locate("k", H(3))) == 8
    assert d2.complete("k", 3) is None
    assert src(d2.locate("k", H(5))) == 3                        # both complete: the lower rank


def test_a_complete_reader_is_answered_with_its_own_copy():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    d.locate("k", H(1))
    assert d.complete("k", 1) is None
    before, used = table(d, "k"), d.used
    found = d.locate("k", H(1))
    assert src(found) == 1 and found.source.complete
    assert src(d.locate("k", H(0))) == 0
    assert table(d, "k") == before and d.used == used


def test_a_reader_asking_again_is_re_pointed_without_a_second_registration():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    d.locate("k", H(1))
    d.locate("k", H(2))
    used = d.used
    assert src(d.locate("k", H(2))) == 1 and d.used == used    # its source is freed, then taken again
    assert d.complete("k", 1) is None
    assert src(d.locate("k", H(2))) == 0                        # re-pointed to the free depth-0 copy
    assert table(d, "k") == {0: (True, None, 1), 1: (True, None, 0), 2: (False, 0, 0)}
    check_chains(d)


def test_locate_without_registering_changes_nothing():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    before, used = table(d, "k"), d.used
    assert src(d.locate("k", H(1), register=False)) == 0
    assert src(d.locate("k", H(2), register=False)) == 0
    assert table(d, "k") == before and d.used == used


# ------------------------------------------------------------------------------------ locality
def test_a_reader_prefers_its_host_then_its_box_over_a_remote_copy():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0, "far", "B"), complete=True) is None
    assert src(d.locate("k", H(1, "h1", "A"))) == 0
    assert d.complete("k", 1) is None                            # 0 and 1 complete and free
    assert src(d.locate("k", H(2, "h2", "A"))) == 1              # its box before the lower rank
    assert d.complete("k", 2) is None
    assert src(d.locate("k", H(3, "h2", "A"))) == 2              # its host before its box
    assert src(d.locate("k", H(4, "h4", "A"))) == 1              # its box (depth 0) before remote 0
    assert src(d.locate("k", H(5, "h5", "A"))) in (3, 4)         # a partial copy in its box, depth 2
    assert parents(d, "k")[5] != 0                               # ... not the complete remote one
    assert src(d.locate("k", H(6, "h6", "C"))) == 0              # remote everywhere: the shallowest
    check_chains(d)


def test_locality_beats_depth_and_completeness():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0, "h0", "B"), complete=True) is None
    assert src(d.locate("k", H(1, "h1", "A"))) == 0
    assert d.complete("k", 1) is None
    assert src(d.locate("k", H(2, "h2", "A"))) == 1
    assert src(d.locate("k", H(3, "h2", "A"))) == 2              # same host, partial, depth 2 ...
    assert table(d, "k")[0] == (True, None, 0)                   # ... though 0 (complete, depth 0) is free


def test_a_thin_link_is_crossed_once():
    """Two boxes of three readers each, the source in box A, readers arriving A, B, A, B, ...:
    at most one reader in box B may read from box A."""
    d = ObjectDirectory()
    source = H(0, "a0", "A")
    assert d.put("k", BIG, source, complete=True) is None
    a = [H(r, f"a{r}", "A") for r in (1, 2, 3)]
    b = [H(r, f"b{r}", "B") for r in (11, 12, 13)]
    for x, y in zip(a, b):
        assert isinstance(d.locate("k", x), Source)
        assert isinstance(d.locate("k", y), Source)
    check_chains(d)
    box = {h.rank: h.box for h in [source, *a, *b]}
    p = parents(d, "k")
    crossing = [h.rank for h in b if box[p[h.rank]] == "A"]
    assert len(crossing) <= 1, f"box B readers {crossing} read from box A; parents {p}"


# -------------------------------------------------------------------------------------- faults
def test_a_lost_source_is_dropped_and_the_reader_goes_to_its_parent():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    for r in (1, 2, 3):
        d.locate("k", H(r))
    used = d.used
    found = d.locate("k", H(3), lost_source=2)
    assert src(found) == 1 and d.used == used - ENTRY_OVERHEAD
    assert table(d, "k") == {0: (True, None, 1), 1: (False, 0, 1), 3: (False, 1, 0)}
    check_chains(d)


def test_a_lost_source_reported_after_drop_rank():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    for r in (1, 2, 3):
        d.locate("k", H(r))
    d.drop_rank(2)
    assert 2 not in table(d, "k") and table(d, "k")[1][2] == 0   # 2's source is free again
    assert src(d.locate("k", H(3), lost_source=2)) == 1
    check_chains(d)


def test_drop_rank_removes_every_copy_of_the_rank():
    d = ObjectDirectory()
    for k, owner in (("a", 0), ("b", 1), ("c", 2)):
        assert d.put(k, BIG, H(owner), complete=True) is None
    d.locate("a", H(1))
    d.locate("a", H(2))
    d.locate("c", H(1))
    assert d.put("tiny", Meta(1, "u8", (1,)), None, inline=b"t") is None
    used = d.used
    d.drop_rank(1)
    assert d.used == used - 3 * ENTRY_OVERHEAD
    assert 1 not in table(d, "a") and table(d, "b") == {} and 1 not in table(d, "c")
    assert table(d, "a")[0] == (True, None, 0) and table(d, "c")[2] == (True, None, 0)
    assert d.info("tiny").inline == b"t"
    d.drop_rank(1)                                               # twice: nothing more
    d.drop_rank(99)
    assert d.used == used - 3 * ENTRY_OVERHEAD
    lost = d.locate("b", H(5))                                   # no copy left
    assert lost.kind == LOST and "'b'" in lost.message
    check_chains(d)


def test_a_reader_whose_only_upstream_is_gone_is_told_the_object_is_lost():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    for r in (1, 2, 3):
        d.locate("k", H(r))
    d.drop_rank(0)
    lost = d.locate("k", H(1), lost_source=0)                   # 2 and 3 hold less than 1
    assert lost.kind == LOST and "rank 1" in lost.message
    assert 1 in table(d, "k")                                   # its partial copy is still listed
    assert src(d.locate("k", H(7))) == 3                        # a new reader still gets the tail


def test_a_reader_is_never_re_pointed_to_itself_or_its_descendants():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0, "x", "B"), complete=True) is None
    assert src(d.locate("k", H(9, "z", "C"))) == 0
    assert d.complete("k", 9) is None                            # two complete copies, 0 and 9
    assert src(d.locate("k", H(1, "h", "A"))) == 0
    assert src(d.locate("k", H(2, "h", "A"))) == 1               # same host as 1
    assert src(d.locate("k", H(3, "h", "A"))) == 2               # same host as 1
    assert src(d.locate("k", H(4, "y", "C"))) == 9               # its box
    found = d.locate("k", H(1, "h", "A"), lost_source=0)
    # 2 and 3 share its host but pull from it; 4 (another box, free) is the only copy left
    assert src(found) == 4
    assert parents(d, "k") == {1: 4, 2: 1, 3: 2, 4: 9, 9: None}
    check_chains(d)


def test_abandoning_a_middle_copy_frees_its_source_and_its_reader_moves_on():
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    for r in (1, 2):
        d.locate("k", H(r))
    assert d.abandon("k", 1) is None
    t = table(d, "k")
    assert 1 not in t and t[0] == (True, None, 0)
    check_chains(d)
    assert src(d.locate("k", H(2), lost_source=1)) == 0
    assert table(d, "k") == {0: (True, None, 1), 2: (False, 0, 0)}


def test_a_reader_that_gives_up_and_reads_again_is_not_fed_by_its_former_reader():
    """1 reads from 0 and feeds 2; 1's read fails (abandon) and 1 asks again. 2 still pulls from
    (the old) 1: the new location of rank 1 must not count wrong, nor form a cycle with 2."""
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0, "s", "B"), complete=True) is None
    assert src(d.locate("k", H(1, "h", "A"))) == 0
    assert src(d.locate("k", H(2, "h", "A"))) == 1
    assert d.abandon("k", 1) is None
    check_chains(d)
    d.locate("k", H(1, "h", "A"))
    check_chains(d)                        # 1 -> 2 -> 1 would wait on each other forever
    assert isinstance(d.locate("k", H(2, "h", "A"), lost_source=1), Source)
    check_chains(d)


def test_a_stale_lost_source_does_not_drop_a_live_copy():
    """2 reported rank 1 lost after 1 (which had given up) registered again with a new copy:
    the directory must keep 1's new copy (1 is alive and pulling)."""
    d = ObjectDirectory()
    assert d.put("k", BIG, H(0), complete=True) is None
    d.locate("k", H(1))
    d.locate("k", H(2))
    assert d.abandon("k", 1) is None
    assert src(d.locate("k", H(1))) == 0
    found = d.locate("k", H(2), lost_source=1)
    assert isinstance(found, Source) and found.source.holder.rank != 2
    assert 1 in table(d, "k")
    assert d.complete("k", 1) is None
    check_chains(d)


# ---------------------------------------------------------------------------- property test
KEYS = ("a", "b")
RANKS = range(5)
INLINE_LIMIT = 16


@dataclass
class MLoc:
    holder: Holder
    complete: bool
    depth: int = 0
    parent: int | None = None       # a live link: the parent counts this reader
    orphan_of: int | None = None    # the rank it pulled from until that copy was dropped


@dataclass
class MEntry:
    meta: Meta
    inline: bytes | None
    locs: dict[int, MLoc] = field(default_factory=dict)


class Model:
    """The directory as documented, with children and downstream sets recomputed by brute force."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: dict[str, MEntry] = {}
        self.deleted: set[str] = set()

    def used(self) -> int:
        return sum(ENTRY_OVERHEAD * (1 + len(e.locs)) + len(e.inline or b"") for e in self.entries.values())

    @staticmethod
    def readers_of(e: MEntry, rank: int) -> list[int]:
        return [r for r, l in e.locs.items() if l.parent == rank]

    def below(self, e: MEntry, rank: int) -> set[int]:
        out: set[int] = set()
        changed = True
        while changed:
            changed = False
            for r, l in e.locs.items():
                if r != rank and r not in out and (l.parent == rank or l.parent in out):
                    out.add(r)
                    changed = True
        return out

    def missing(self, key):
        return ("refused", DELETED) if key in self.deleted else ("waiting",)

    def gone(self, key):
        return ("refused", DELETED if key in self.deleted else NOT_FOUND)

    def drop(self, e: MEntry, rank: int) -> None:
        if e.locs.pop(rank, None) is None:
            return
        for l in e.locs.values():
            if l.parent == rank:
                l.parent, l.orphan_of = None, rank

    def put(self, key, meta, holder, complete, inline):
        if key in self.entries:
            return ("refused", EXISTS)
        if inline is not None and (len(inline) != meta.size or meta.size > INLINE_LIMIT):
            return ("refused", INVALID)
        e = MEntry(meta, inline)
        if inline is None:
            e.locs[holder.rank] = MLoc(holder, complete)
        cost = ENTRY_OVERHEAD * (1 + len(e.locs)) + len(inline or b"")
        if self.used() + cost > self.max_bytes:
            return ("refused", FULL)
        self.entries[key] = e
        self.deleted.discard(key)
        return None

    def locate(self, key, reader: Holder, lost):
        e = self.entries.get(key)
        if e is None:
            return self.missing(key)
        if e.inline is not None:
            return ("inline", e.inline)
        mine = e.locs.get(reader.rank)
        if lost is not None and (mine is None or mine.parent == lost):
            self.drop(e, lost)
            mine = e.locs.get(reader.rank)
        if mine is not None and mine.complete:
            return ("source", reader.rank)
        if mine is not None:
            mine.parent = mine.orphan_of = None
        banned = self.below(e, reader.rank) if mine is not None else set()
        allowed = [r for r in e.locs if r != reader.rank and r not in banned]
        if not allowed:
            return ("refused", LOST)

        def preference(r):  # own box first (even busy), then free, own host, shortest chain
            h = e.locs[r].holder
            other_box = bool(h.box and reader.box and h.box != reader.box)
            return (other_box, len(self.readers_of(e, r)), h.host != reader.host or not h.host,
                    e.locs[r].depth, not e.locs[r].complete, r)

        best = min(allowed, key=preference)
        if mine is None:
            if self.used() + ENTRY_OVERHEAD > self.max_bytes:
                return ("refused", FULL)
            mine = e.locs[reader.rank] = MLoc(reader, False)
        mine.parent, mine.depth = best, e.locs[best].depth + 1
        return ("source", best)

    def complete(self, key, rank):
        e = self.entries.get(key)
        if e is None:
            return self.gone(key)
        l = e.locs.get(rank)
        if l is None:
            return ("refused", NOT_FOUND)
        l.parent = l.orphan_of = None
        l.complete, l.depth = True, 0
        return None

    def abandon(self, key, rank):
        e = self.entries.get(key)
        if e is None:
            return self.gone(key)
        self.drop(e, rank)
        return None

    def drop_rank(self, rank):
        for e in self.entries.values():
            self.drop(e, rank)

    def delete(self, key):
        e = self.entries.pop(key, None)
        if e is None:
            return (False, set())
        self.deleted.add(key)
        return (True, {l.holder for l in e.locs.values()})


def outcome(x):
    """A directory answer in the model's terms."""
    if x is None:
        return None
    if isinstance(x, Refusal):
        return ("refused", x.kind)
    if isinstance(x, Waiting):
        return ("waiting",)
    assert isinstance(x, Source), x
    if x.inline is not None:
        return ("inline", x.inline)
    return ("source", x.source.holder.rank)


def compare(d: ObjectDirectory, m: Model) -> None:
    check_chains(d)
    assert d.used == m.used()
    assert len(d) == len(m.entries)
    for key in KEYS:
        info = d.info(key)
        e = m.entries.get(key)
        if e is None:
            assert isinstance(info, Refusal) and info.kind == (DELETED if key in m.deleted else NOT_FOUND)
            continue
        assert info.meta == e.meta and info.inline == e.inline
        t = table(d, key)
        assert set(t) == set(e.locs), (key, t, e.locs)
        for r, (complete, parent, children) in t.items():
            l = e.locs[r]
            assert complete == l.complete, (key, r, t)
            assert children == len(m.readers_of(e, r)), (key, r, t)
            if l.orphan_of is None:
                assert parent == l.parent, (key, r, t)
            else:  # its source was dropped: no parent, or the dropped rank while it has no new copy
                assert parent is None or (parent == l.orphan_of and parent not in t), (key, r, t)


@st.composite
def scenarios(draw):
    boxes = {h: draw(st.sampled_from(["", "A", "B"])) for h in ("h0", "h1", "h2", "h3")}
    holders = {}
    for r in RANKS:
        host = draw(st.sampled_from(["", "h0", "h1", "h2", "h3"]))
        box = boxes[host] if host else draw(st.sampled_from(["", "A", "B"]))
        holders[r] = Holder(r, f"10.0.0.1:{4000 + r}", host, box)
    op = st.tuples(st.sampled_from(OPS), st.sampled_from(KEYS), st.sampled_from(RANKS), st.booleans(),
                   st.sampled_from([None, None, "source", "source", *RANKS]),
                   st.sampled_from([None, None, None, 0, 5, INLINE_LIMIT, INLINE_LIMIT + 1]))
    max_bytes = draw(st.sampled_from([1 << 30, 1 << 30, 3 * ENTRY_OVERHEAD + 5, 6 * ENTRY_OVERHEAD,
                                      9 * ENTRY_OVERHEAD + 12]))
    first = [("put", k, r, c, None, None) for k, r, c in draw(st.lists(
        st.tuples(st.sampled_from(KEYS), st.sampled_from(RANKS), st.booleans()), min_size=1, max_size=2))]
    return holders, max_bytes, first + draw(st.lists(op, min_size=8, max_size=40))


# weights; "retry" is a read that failed and is tried again (abandon, locate), "restart" a rank that
# died and came back (drop_rank, locate)
OPS = ("put", "put", *["locate"] * 8, "complete", "complete", "complete", "abandon", "drop_rank", "delete",
       "retry", "restart")


def expand(op) -> list[tuple]:
    name, key, rank, flag, lost, inline_size = op
    if name == "put":
        return [("put", key, rank, flag, inline_size)]
    if name == "locate":
        return [("locate", key, rank, lost)]
    if name in ("complete", "abandon"):
        return [(name, key, rank)]
    if name == "drop_rank":
        return [("drop_rank", rank)]
    if name == "delete":
        return [("delete", key)]
    if name == "retry":
        return [("abandon", key, rank), ("locate", key, rank, None)]
    return [("drop_rank", rank), ("locate", key, rank, None)]


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_random_operations_keep_the_chains_consistent(scenario):
    holders, max_bytes, ops = scenario
    d, m = ObjectDirectory(max_bytes=max_bytes, inline_limit=INLINE_LIMIT), Model(max_bytes)
    for step, op in enumerate(o for x in ops for o in expand(x)):
        name, args = op[0], op[1:]
        if name == "put":
            key, rank, complete, inline_size = args
            if inline_size is None:
                meta, inline = BIG, None
            else:
                meta, inline = Meta(inline_size, "uint8", (inline_size,)), bytes(range(inline_size))
            got, want = d.put(key, meta, holders[rank], complete=complete, inline=inline), \
                m.put(key, meta, holders[rank], complete, inline)
        elif name == "locate":
            key, rank, lost = args
            e = m.entries.get(key)
            mine = e.locs.get(rank) if e is not None else None
            if lost == "source":   # what a reader reports: the copy it was pulling from
                lost = None if mine is None else (mine.parent if mine.parent is not None else mine.orphan_of)
            elif lost is not None and mine is not None:
                lost = None        # a registered reader only ever reports its own source
            if lost == rank:
                lost = None
            got, want = d.locate(key, holders[rank], lost_source=lost), m.locate(key, holders[rank], lost)
            assert want != ("waiting",) or key not in m.entries, "every copy busy: cannot happen with chains"
        elif name == "complete":
            got, want = d.complete(*args), m.complete(*args)
        elif name == "abandon":
            got, want = d.abandon(*args), m.abandon(*args)
        elif name == "drop_rank":
            got, want = d.drop_rank(*args), m.drop_rank(*args)
        else:
            got, want = d.delete(*args), m.delete(*args)
            got = (got[0], set(got[1]))
        if name != "delete":
            got = outcome(got)
        assert got == want, f"step {step} {op}: directory {got}, model {want}"
        compare(d, m)


def test_one_box_keeps_chains():
    """Without boxes (or all in one), a copy never feeds two readers at once: chains."""
    for box in ("", "A"):
        d = ObjectDirectory()
        assert d.put("k", BIG, H(0, "h0", box), complete=True) is None
        for r in range(1, 9):
            d.locate("k", H(r, f"h{r}", box))
            if r % 3 == 0:
                d.complete("k", r - 1)
        t = table(d, "k")
        assert all(children <= 1 for _, _, children in t.values()), t
        check_chains(d)
