"""Large collective payloads by reference between ranks of one machine
(collcomm.transport.tcp.references): the receiver reads them out of the sender's memory with
process_vm_readv instead of through the socket.

Real transports and processes: two transports in this process, a job of real ranks running every
collective on the Unix socket (shared memory off), and a receiver that runs as another user and
so may not read the sender's memory, whose link falls back to inline payloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import linkpair
import multiproc
from shm_support import cma_allowed

import collcomm as cc
from collcomm.transport import frames
from collcomm.transport.interface import P2P_BASE
from collcomm.transport.tcp import TcpTransport, references

HERE = Path(__file__).resolve().parent
needs_cma = pytest.mark.skipif(not cma_allowed(), reason="process_vm_readv is not allowed here (seccomp or ptrace)")


def _send(link, op: int, data: np.ndarray) -> threading.Event:
    acked = threading.Event()
    view = memoryview(data).cast("B")
    link.send(frames.data_header(linkpair.GROUP, 0, op, 0, 0, 0, view), view, acked.set)
    return acked


# ---------------------------------------------------------------------------- two transports
@needs_cma
@pytest.mark.timeout(60)
def test_large_payloads_are_read_out_of_the_senders_memory_small_ones_travel_inline():
    a, b = linkpair.transports()
    try:
        la, lb = linkpair.links(a, b)
        assert la.sock.family.name == "AF_UNIX" and la.by_reference
        rng = np.random.default_rng(5)
        sizes = [1, 1000, 64 << 10, (64 << 10) + 1, 3 << 20]
        for op, n in enumerate(sizes):
            data = rng.integers(0, 256, n, dtype=np.uint8)
            box = linkpair.Box(n)
            b.mailbox(linkpair.GROUP).register(op, box)
            acked = _send(la, op, data)
            assert box.arrived.wait(10) and box.error is None, box.error
            assert acked.wait(10)
            b.mailbox(linkpair.GROUP).finish(op)
            assert bytes(box.buf) == data.tobytes(), n
        # Only the two payloads over the threshold (64 KiB) went by reference.
        assert references.REFERENCE_MIN_BYTES == 64 << 10 and lb.reference_reads == 2
        assert lb.reference_refusals == 0 and a.telemetry.link(0, 1).retransmits == 0
        assert b.telemetry.link(0, 1).bytes >= sum(sizes)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_by_reference_off_sends_every_payload_inline(monkeypatch):
    monkeypatch.setenv("COLLCOMM_BY_REFERENCE", "0")
    assert not references.enabled()
    a, b = linkpair.transports()
    try:
        la, lb = linkpair.links(a, b)
        data = np.arange(1 << 20, dtype=np.uint8)
        box = linkpair.Box(data.size)
        b.mailbox(linkpair.GROUP).register(0, box)
        acked = _send(la, 0, data)
        assert box.arrived.wait(10) and acked.wait(10) and bytes(box.buf) == data.tobytes()
        assert not la.by_reference and lb.reference_reads == 0
    finally:
        a.close()
        b.close()


def test_the_setting_is_checked(monkeypatch):
    monkeypatch.setenv("COLLCOMM_BY_REFERENCE", "sometimes")
    with pytest.raises(ValueError, match="COLLCOMM_BY_REFERENCE='sometimes'"):
        references.enabled()


# ---------------------------------------------------------------------------- another user
RECEIVER = r"""
import json, os, sys, threading
import numpy as np
sys.path.insert(0, sys.argv[1])
import linkpair
from collcomm.transport import frames
from collcomm.transport.interface import P2P_BASE
from collcomm.transport.tcp import TcpTransport

t = TcpTransport(1, "tok")
print(t.address, flush=True)
t.set_peers({0: sys.stdin.readline().strip()})
os.setgid(65534)  # nobody: it may no longer read the memory of the sender, which runs as root
os.setuid(65534)
link = t.link(0, linkpair.GROUP, 0, 10)
out = []
for op, n in enumerate((3 << 20, 1 << 20)):
    box = linkpair.Box(n)
    t.mailbox(linkpair.GROUP).register(op, box)
    ok = box.arrived.wait(20) and box.error is None
    t.mailbox(linkpair.GROUP).finish(op)
    out.append([ok, frames.checksum(bytes(box.buf))])
p2p = t.link(0, P2P_BASE, 0, 10)  # a point-to-point message of 16 MB: by reference, unchecked
box = linkpair.Box(16 << 20)
t.mailbox(P2P_BASE, 0).register(0, box)
ok = box.arrived.wait(20) and box.error is None
out.append([ok, frames.checksum(bytes(box.buf))])
print(json.dumps({"got": out, "reads": link.reference_reads + p2p.reference_reads,
                  "refusals": [link.reference_refusals, p2p.reference_refusals],
                  "retransmit_errors": dict(t.telemetry.link(0, 1).errors)}), flush=True)
t.close()
"""


@needs_cma
@pytest.mark.timeout(60)
def test_a_receiver_that_may_not_read_the_senders_memory_gets_the_payloads_inline(tmp_path):
    """The receiver runs as another user (nobody) and the kernel refuses its process_vm_readv of
    the sender's memory: it asks for the payload inline (a NACK flagged SEND_INLINE), the payload
    arrives exact, the sender's link sends inline from then on, and nothing counts as a
    retransmission or a checksum error (the monitor would read those as a faulty link). The same
    for a 16 MB point-to-point message on its own link, sent without a checksum for the read by
    reference: inline, it carries the checksum of its first copy."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the receiver as another user")
    script = tmp_path / "receiver.py"
    script.write_text(RECEIVER)
    os.chmod(tmp_path, 0o755)
    child = subprocess.Popen([sys.executable, str(script), str(HERE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    a = None
    try:
        peer = child.stdout.readline().strip()
        assert peer, child.stderr.read()
        a = TcpTransport(0, "tok")
        a.set_peers({1: peer})
        child.stdin.write(a.address + "\n")
        child.stdin.flush()
        la = a.link(1, linkpair.GROUP, 0, 10)
        assert la.by_reference
        rng = np.random.default_rng(9)
        sent = []
        for op, n in enumerate((3 << 20, 1 << 20)):
            data = rng.integers(0, 256, n, dtype=np.uint8)
            assert _send(la, op, data).wait(20)
            sent.append(frames.checksum(data.tobytes()))
        lp = a.link(1, P2P_BASE, 0, 10)
        data = rng.integers(0, 256, 16 << 20, dtype=np.uint8)
        assert lp.sends_by_reference(data.size)  # so, as collcomm.runtime.p2p.send does, without a checksum
        view = memoryview(data)
        sent_p2p = threading.Event()
        lp.send(frames.data_header(P2P_BASE, 0, 0, 0, 0, 0, view, verified=True), view, sent_p2p.set)
        assert sent_p2p.wait(20)
        sent.append(frames.checksum(data.tobytes()))
        answer = json.loads(child.stdout.readline() or json.dumps({"stderr": child.stderr.read()}))
        assert answer.get("got") == [[True, c] for c in sent], answer
        # Once per link: each went inline from then on (the message with its checksum: the
        # receiver checks every inline one, so "got" matching proves it arrived whole).
        assert answer["reads"] == 0 and answer["refusals"] == [1, 1], answer
        assert not la.by_reference and not lp.by_reference
        assert a.telemetry.link(0, 1).retransmits == 0 and answer["retransmit_errors"] == {}, answer
        assert child.wait(20) == 0, child.stderr.read()
    finally:
        if a is not None:
            a.close()
        if child.poll() is None:
            child.kill()
            child.wait(10)


# ---------------------------------------------------------------------------- a real job
def every_collective_by_reference(count: int) -> dict:
    """Every collective of ``count`` float32 per rank over the Unix socket against NumPy, and how
    many payloads this rank read by reference."""
    n, me = cc.world_size(), cc.rank()
    rng = np.random.default_rng(11)
    x = rng.integers(-8, 9, (n, count)).astype(np.float32)
    wrong = []
    a = x[me].copy()
    cc.allreduce(a)
    wrong += [] if np.array_equal(a, x.sum(axis=0)) else ["allreduce"]
    g = np.empty(n * count, np.float32)
    cc.allgather(g, x[me].copy())
    wrong += [] if np.array_equal(g, x.reshape(-1)) else ["allgather"]
    full = rng.integers(-8, 9, (n, n * count)).astype(np.float32)
    out = np.empty(count, np.float32)
    cc.reduce_scatter(out, full[me].copy())
    wrong += [] if np.array_equal(out, full.sum(axis=0)[me * count:(me + 1) * count]) else ["reduce_scatter"]
    b = x[me].copy()
    cc.broadcast(b, root=n - 1)
    wrong += [] if np.array_equal(b, x[n - 1]) else ["broadcast"]
    blocks = rng.integers(-8, 9, (n, n, count)).astype(np.float32)  # [sender][receiver]
    got = np.empty(n * count, np.float32)
    cc.alltoall(got, blocks[me].reshape(-1).copy())
    wrong += [] if np.array_equal(got, blocks[:, me].reshape(-1)) else ["alltoall"]
    reads = sum(l.reference_reads for l in cc.api.runtime().transport._all_links())
    cc.barrier()  # counted before any peer shuts down (its closing fails and drops the link here)
    return {"wrong": wrong, "reads": reads, "local": bool(cc.api._group(None)._local)}


@needs_cma
@pytest.mark.timeout(200)
@pytest.mark.parametrize("by_reference", ["1", "0"])
def test_every_collective_of_a_job_exact_with_payloads_by_reference_or_inline(by_reference):
    job = multiproc.run(3, every_collective_by_reference, kwargs={"count": 300_001}, timeout=150,
                        env={"COLLCOMM_TRANSPORT": "unix", "COLLCOMM_BY_REFERENCE": by_reference}).check()
    for rank, v in enumerate(job.values()):
        assert v["wrong"] == [] and not v["local"], (rank, v)
        assert (v["reads"] > 0) == (by_reference == "1"), (rank, v)


# ---------------------------------------------------------------------------- no checksum on one machine
@pytest.mark.timeout(60)
def test_a_collectives_unix_link_sends_without_checksums_and_a_detour_puts_them_back():
    """On a collective's Unix socket (no injected faults) payloads travel unchecked: nothing
    between the processes can alter them (and one read by reference after its operation was
    given up is dropped: see the revocation tests). A frame that leaves by a detour gets its
    checksum back, since a relay's hops may be wires."""
    a, b = linkpair.transports()
    try:
        la, lb = linkpair.links(a, b)
        assert la.same_machine and la.payload_verified(1000) and la.payload_verified(1 << 20)
        data = np.arange(1000, dtype=np.uint8)
        box = linkpair.Box(data.size)
        b.mailbox(linkpair.GROUP).register(0, box)
        view = memoryview(data)
        header = frames.data_header(linkpair.GROUP, 0, 0, 0, 0, 0, view, verified=la.payload_verified(view.nbytes))
        assert header.flags & frames.NO_CHECKSUM
        acked = threading.Event()
        la.send(header, view, acked.set)
        assert box.arrived.wait(10) and acked.wait(10) and box.error is None and bytes(box.buf) == data.tobytes()

        class Relay:  # what a detour hands the relay's link: the RELAY frame around this one
            group, epoch, relayed = linkpair.GROUP | (1 << 30), 0, []

            def _enqueue_own(self, kind, raw, payload):
                self.relayed.append((raw, payload))

        relay = Relay()
        la.detour = relay
        assert not la.payload_verified(1000)  # new frames carry their checksum on a detour
        la._relay_raw(header.pack(), view)
        la.detour = None
        (raw, payload), = relay.relayed
        inner = frames.unpack_header(raw[frames.HEADER_SIZE:])
        assert not inner.flags & frames.NO_CHECKSUM and inner.checksum == frames.checksum(view)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------- point-to-point
def large_messages(nbytes: int) -> dict:
    """Rank 0 sends ``nbytes`` to rank 1, which posts its receive late; rank 0 then overwrites its
    buffer. Then both send to each other before receiving (``mutual``: works below the socket's
    capacity, inline or by reference alike)."""
    me = cc.rank()
    x = np.arange(nbytes // 4, dtype=np.float32) + me
    out = {}
    if me == 0:
        cc.send(x, 1)
        out["send_returned"] = time.monotonic()
        x[:] = -1  # the receiver must have read the message by now
    else:
        time.sleep(0.3)  # posts its receive late: a send by reference must wait for it
        out["recv_posted"] = time.monotonic()
        y = np.empty_like(x)
        cc.recv(y, 0)
        out["exact"] = bool(np.array_equal(y, np.arange(nbytes // 4, dtype=np.float32)))
    small = np.full(6 << 18, me, np.float32)  # 6 MB: fits the socket, so a blocking send returns
    got = np.empty_like(small)
    cc.send(small, 1 - me, timeout=20)
    cc.recv(got, 1 - me, timeout=20)
    out["mutual"] = bool((got == 1 - me).all())
    out["reads"] = sum(l.reference_reads for l in cc.api.runtime().transport._all_links())
    cc.barrier()
    return out


@needs_cma
@pytest.mark.timeout(120)
@pytest.mark.parametrize("by_reference", ["1", "0"])
def test_a_large_message_by_reference_is_read_before_its_send_returns(by_reference):
    nbytes = references.P2P_REFERENCE_MIN_BYTES
    r0, r1 = multiproc.run(2, large_messages, kwargs={"nbytes": nbytes}, timeout=100,
                           env={"COLLCOMM_BY_REFERENCE": by_reference}).check().values()
    assert r1["exact"] and r0["mutual"] and r1["mutual"], (r0, r1)
    assert r0["send_returned"] > r1["recv_posted"], (r0, r1)  # (inline too: the socket cannot hold it)
    # Only the large message went by reference (the 6 MB ones are under the threshold).
    assert (r1["reads"], r0["reads"]) == ((1, 0) if by_reference == "1" else (0, 0)), (r0, r1)


class Delivered(linkpair.Box):
    delivered_once = False

    def delivered(self, header, view, peer):
        self.delivered_once = True
        super().delivered(header, view, peer)


@needs_cma
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["collective", "point-to-point"])
def test_a_payload_read_after_its_operation_was_given_up_is_dropped(kind):
    """The sender gives an operation up (revoke, as a failed operation does before its caller
    hears of it) and rewrites the buffer; the receiver reads the payload by reference only then
    (its operation registers late): it drops what it read and never delivers it. A collective's
    ABORT frame then fails the operation with the sender's cause; a point-to-point receive fails
    at once, naming the sender."""
    group = linkpair.GROUP if kind == "collective" else P2P_BASE + 7
    a, b = linkpair.transports()
    try:
        la, lb = linkpair.links(a, b, group=group)
        data = np.arange(32 << 20, dtype=np.uint8)  # 32 MB: by reference for a message too
        acked = _send(la, 0, data) if kind == "collective" else None
        if acked is None:
            view = memoryview(data)
            la.send(frames.data_header(group, 0, 0, 0, 0, 0, view), view)
        la.revoke(0)
        data[:] = 7  # what the caller may do once its operation failed
        box = Delivered(data.size)
        b.mailbox(group, 0).register(0, box)  # only now does the receiver read the frame
        if kind == "collective":
            la.abort(0, cc.CollectiveTimeout("the sender's operation timed out"))
        assert box.arrived.wait(10)
        assert isinstance(box.error, cc.CollectiveTimeout if kind == "collective" else cc.PeerFailure), box.error
        assert lb.reference_revoked == 1 and lb.reference_reads == 0 and not box.delivered_once
    finally:
        a.close()
        b.close()


def late_reader() -> dict:
    """Rank 0's send of 16 MiB times out before rank 1 posts its receive; rank 0 rewrites the
    buffer; rank 1's receive must not return those bytes."""
    me = cc.rank()
    client = cc.api.runtime().client
    x = np.full(references.P2P_REFERENCE_MIN_BYTES // 4, 1.0, np.float32)
    if me == 0:
        try:
            cc.send(x, 1, timeout=0.5)
            out = {"send": "returned"}
        except cc.CollectiveError as e:
            x[:] = -1.0
            out = {"send": type(e).__name__}
        client.kv_set("late-reader/sender-done", b"1")
    else:
        client.kv_get("late-reader/sender-done", timeout=30)  # posts its receive after the sender gave up
        y = np.zeros_like(x)
        try:
            cc.recv(y, 0, timeout=10)
            out = {"recv": "returned", "ones": bool((y == 1.0).all())}
        except cc.CollectiveError as e:
            out = {"recv": type(e).__name__, "msg": str(e)}
    cc.barrier()  # rank 0 stays (its memory readable) until rank 1 is done
    return out


@needs_cma
@pytest.mark.timeout(60)
def test_a_send_that_timed_out_is_not_received_from_its_rewritten_buffer():
    r0, r1 = multiproc.run(2, late_reader, timeout=50).check().values()
    assert r0 == {"send": "CollectiveTimeout"}, r0
    assert r1["recv"] == "PeerFailure" and "gave up" in r1["msg"], r1
