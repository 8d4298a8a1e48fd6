"""Objects in flight under faults, with real processes driven step by step (tests/faultjobs.py).

A source SIGKILLed mid-broadcast, a reader SIGKILLed in the middle of a chain, a reduce input's
holder SIGKILLed with a spare input, and the coordinator stopped: each with exact bytes and an
elapsed-time bound. Streams are slowed with a fault plan (``COLLCOMM_FAULTS`` throttle, which
paces the object server's sends) so that a kill lands mid-transfer, and the test waits on the
reader's own progress (not on a sleep) before it kills.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from faultjobs import Job, raised

pytestmark = [pytest.mark.timeout(150),
              pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")]

MiB = 1 << 20

# put a seeded random object, or check one against the same seed (digest of the bytes)
PUT = """
arr = np.random.default_rng({seed}).integers(0, 1 << 30, size={n}, dtype=np.int64)
cc.put({key!r}, arr)
result = True
"""
GET = """
t0 = time.monotonic()
got = cc.get({key!r}, timeout={wait})
ref = np.random.default_rng({seed}).integers(0, 1 << 30, size={n}, dtype=np.int64)
layer = cc.api.runtime().objects
copy = layer.store.get({key!r})
result = {{"equal": bool(np.array_equal(got, ref)), "received": copy.received if copy else None,
          "t1": time.monotonic(), "elapsed": time.monotonic() - t0}}
"""
PROGRESS = """
layer = cc.api.runtime().objects  # (None until this rank's first object call started)
names = [n for n in layer.store.names() if n.startswith({prefix!r})] if layer else []
result = max([layer.store.get(n).progress for n in names if layer.store.get(n)] or [0])
"""


def _exec(job, rank, code, timeout=60.0, **fmt):
    answer = job.ranks[rank].call({"cmd": "exec", "code": code.format(**fmt)}, timeout=timeout)
    assert answer.get("ok"), answer
    return answer["result"]


def _exec_async(job, rank, code, **fmt) -> int:
    return job.ranks[rank].send({"cmd": "exec", "code": code.format(**fmt), "async": True})


def _wait_progress(job, rank, prefix, at_least, timeout=30.0) -> int:
    """Poll ``rank``'s copy (name starting with ``prefix``) until it holds ``at_least`` bytes."""
    deadline = time.monotonic() + timeout
    while True:
        got = _exec(job, rank, PROGRESS, prefix=prefix)
        if got >= at_least:
            return got
        assert time.monotonic() < deadline, f"rank {rank} got only {got} bytes of {prefix}"
        # (no sleep: each poll is a round trip to the rank)


def _boxes(tmp_path, boxes: list[str]) -> str:
    """A star topology whose compute nodes sit in the given boxes (a topology's hosts)."""
    nodes = [{"id": f"n{i}", "kind": "compute", "host": b} for i, b in enumerate(boxes)]
    nodes.append({"id": "sw", "kind": "switch"})
    links = [{"src": f"n{i}", "dst": "sw", "bandwidth": 1} for i in range(len(boxes))]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"format": "collcomm.topology/1", "name": "boxes", "nodes": nodes, "links": links}))
    return str(path)


def test_source_killed_mid_broadcast_readers_resume_from_another_copy(tmp_path):
    """Box A holds the source (rank 0) and readers 2 and 3; box B holds rank 1's complete copy.
    Readers 2 and 3 chain behind the source in their own box (0 -> 2 -> 3), not across to box B.
    Rank 0 dies with rank 2 at least a quarter through: rank 2 resumes from rank 1 at its offset;
    both finish with exact bytes, having been sent again less than 20% of the object."""
    n = (48 * MiB) // 8
    size = n * 8
    env = {"COLLCOMM_TOPOLOGY": _boxes(tmp_path, ["A", "B", "A", "A"]),
           "COLLCOMM_FAULTS": "throttle:0->2:bps=30000000"}
    with Job(4, timeout=60.0, env=env) as job:
        _exec(job, 0, PUT, key="obj", seed=1, n=n)
        first = _exec(job, 1, GET, key="obj", seed=1, n=n, wait=60)
        assert first["equal"]
        pending = {}
        for r in (2, 3):  # in this order: 3 is the tail behind 2
            pending[r] = _exec_async(job, r, GET, key="obj", seed=1, n=n, wait=60)
            _wait_progress(job, r, "obj", 1)
        _wait_progress(job, 2, "obj", size // 4)
        parents = _exec(job, 1, "result = {{l['rank']: l['source'] for l in cc.object_info('obj')['locations']}}")
        killed_at = job.ranks[0].signal(signal.SIGKILL)
        answers = {r: job.ranks[r].answer_to(cid, timeout=60) for r, cid in pending.items()}
    assert parents == {"0": None, "1": None, "2": 0, "3": 2}, parents  # the chain stayed in box A
    for r, a in answers.items():
        assert a.get("ok"), a
        res = a["result"]
        assert res["equal"], (r, res)
        assert res["received"] - size < 0.2 * size, (r, res["received"], size)
        assert res["t1"] - killed_at < 20.0, (r, res["t1"] - killed_at)


def test_reader_killed_in_the_middle_of_a_chain_does_not_stall_those_behind(tmp_path):
    """Chain 0 -> 1 -> 2 -> 3 (rank 0's stream throttled); rank 2 dies with rank 3 a quarter
    through: rank 3 is re-pointed to rank 1 (rank 2's source) and resumes at its offset."""
    n = (32 * MiB) // 8
    size = n * 8
    with Job(4, timeout=60.0, env={"COLLCOMM_FAULTS": "throttle:0->1:bps=25000000"}) as job:
        _exec(job, 0, PUT, key="obj", seed=2, n=n)
        pending = {}
        for r in (1, 2, 3):  # in this order: each becomes the tail of the one chain
            pending[r] = _exec_async(job, r, GET, key="obj", seed=2, n=n, wait=60)
            _wait_progress(job, r, "obj", 1)
        _wait_progress(job, 3, "obj", size // 4)
        parents = _exec(job, 0, "result = {{l['rank']: l['source'] for l in cc.object_info('obj')['locations']}}")
        killed_at = job.ranks[2].signal(signal.SIGKILL)
        answers = {r: job.ranks[r].answer_to(pending[r], timeout=60) for r in (1, 3)}
        after = _exec(job, 0, "result = {{l['rank']: l['complete'] for l in cc.object_info('obj')['locations']}}")
    assert parents == {"0": None, "1": 0, "2": 1, "3": 2}, parents
    for r, a in answers.items():
        assert a.get("ok"), a
        res = a["result"]
        assert res["equal"], (r, res)
        assert res["received"] - size < 0.2 * size, (r, res["received"])
        assert res["t1"] - killed_at < 20.0
    assert after == {"0": True, "1": True, "3": True}, after  # the dead reader's copy is forgotten


REDUCE = """
t0 = time.monotonic()
used = cc.reduce_objects({keys!r}, "total", num_required={k}, timeout={wait})
total = cc.get("total", timeout={wait})
ref = sum(np.random.default_rng(100 + int(key[1:])).integers(0, 1000, size={n}).astype(np.float64) for key in used)
result = {{"used": used, "equal": bool(np.array_equal(total, ref)), "t1": time.monotonic()}}
"""
PUT_INPUT = """
cc.put({key!r}, np.random.default_rng(100 + {i}).integers(0, 1000, size={n}).astype(np.float64))
result = True
"""


def test_reduce_input_holder_killed_uses_a_spare():
    """Inputs g1, g2, g3 on ranks 1-3 form one chain (16 MiB objects) to the root, rank 0; the
    stream into rank 3's stage is throttled. Rank 2 (g2's holder) dies with that stage a quarter
    through; the root cuts the chain there, re-stages g3 behind g1 and takes the spare g4 (put by
    rank 4 only now): the result is exactly g1 + g3 + g4 and the call says so."""
    n = (16 * MiB) // 8
    keys = ["g1", "g2", "g3", "g4"]
    with Job(5, timeout=60.0, env={"COLLCOMM_FAULTS": "throttle:2->3:bps=20000000"}) as job:
        for i in (1, 2, 3):
            _exec(job, i, PUT_INPUT, key=f"g{i}", i=i, n=n)
        root = _exec_async(job, 0, REDUCE, keys=keys, k=3, n=n, wait=60)
        _wait_progress(job, 3, "~reduce/", n * 8 // 4)
        killed_at = job.ranks[2].signal(signal.SIGKILL)
        _exec(job, 4, PUT_INPUT, key="g4", i=4, n=n)
        answer = job.ranks[0].answer_to(root, timeout=60)
    assert answer.get("ok"), answer
    res = answer["result"]
    assert sorted(res["used"]) == ["g1", "g3", "g4"], res
    assert res["equal"], res
    assert res["t1"] - killed_at < 30.0


def test_coordinator_lost_is_a_typed_error_on_every_waiting_call():
    with Job(3, timeout=30.0) as job:
        waits = {1: _exec_async(job, 1, "cc.get('never', timeout=25)\nresult = True"),
                 2: _exec_async(job, 2, "cc.reduce_objects(['x', 'y'], 'z', timeout=25)\nresult = True")}
        # Both calls are waiting in the directory once it answers a third call (requests are served in order).
        _exec(job, 0, "cc.put('probe', np.ones(3))\nresult = True")
        stopped_at = time.monotonic()
        job.server.stop(0)
        answers = {r: job.ranks[r].answer_to(cid, timeout=30) for r, cid in waits.items()}
        late = job.ranks[0].call({"cmd": "exec", "code": "cc.get('other', timeout=5)\nresult = True"}, timeout=30)
    for r, a in answers.items():
        assert not a.get("ok") and raised(a, "CoordinatorUnavailable"), a
        assert a["t1"] - stopped_at < 10.0, a
    assert not late.get("ok") and raised(late, "CollectiveError"), late


def test_a_restarted_rank_puts_and_gets_after_grow():
    """Rank 2 held a copy and dies; the survivors shrink (its copies leave the directory), a new
    process takes rank 2 and everyone grows: the newcomer gets the old object (from a survivor)
    and puts a new one that a survivor gets."""
    n = (8 * MiB) // 8
    with Job(3, timeout=20.0) as job:
        _exec(job, 0, PUT, key="w", seed=5, n=n)
        assert _exec(job, 2, GET, key="w", seed=5, n=n, wait=30)["equal"]
        job.ranks[2].signal(signal.SIGKILL)
        job.ranks[2].wait_exit(10)
        shrunk = job.call_all({"cmd": "shrink"}, ranks=[0, 1], timeout=60)
        assert all(a.get("ok") for a in shrunk), shrunk
        holders = _exec(job, 0, "result = sorted(l['rank'] for l in cc.object_info('w')['locations'])")
        newcomer = job.restart(2)
        assert newcomer.get("ok") and newcomer["rejoining"], newcomer
        grown = job.call_all({"cmd": "grow"}, timeout=60)
        assert all(a.get("ok") and a["members"] == [0, 1, 2] for a in grown), grown
        again = _exec(job, 2, GET, key="w", seed=5, n=n, wait=30)
        _exec(job, 2, PUT, key="x", seed=6, n=n)
        there = _exec(job, 1, GET, key="x", seed=6, n=n, wait=30)
    assert holders == [0], holders  # the dead rank's copy was dropped when it was reported
    assert again["equal"] and there["equal"]
