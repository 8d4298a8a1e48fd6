"""Fuzzing the wire (issue 20, item 5): the frame decoder and the handshake fed arbitrary bytes.

Each surface gets arbitrary bytes and mutations of valid input, and must either decode or raise
the library's own error (ProtocolError, AuthenticationError; a closed connection), never another
exception, never a hang, and never allocate on a peer's word (a header claiming 2^40 bytes):

* ``frames.unpack_header`` / ``unpack_hello`` / ``error_from_abort``, in this process;
* a real link's receiving side (two transports linked for a group), bytes written into the
  established connection: nothing is delivered that its checksum does not cover, the link either
  carries on or fails with a typed error, and the Python heap grows by less than a few MiB;
* the handshake, both sides, over a socket pair; and a rank's real listeners (TCP and Unix),
  which refuse every such connection and still let a correct peer in afterwards.

A short run here; ``-m slow`` runs the same properties on many more inputs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import termios
import threading
import time
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collcomm.errors import AuthenticationError, CollectiveError
from collcomm.transport import frames
from collcomm.transport.frames import HEADER_SIZE, Header, ProtocolError
from collcomm.transport.tcp import handshake
from collcomm.transport.tcp.sockets import split_address

TOKEN = b"fuzz-token-0123456789"
GROUP = 5  # linkpair's
SHORT = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAP_BOUND = 4 << 20  # what decoding hostile bytes may allocate, at most

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
# Lengths a hostile header claims: small ones, and those just past every bound, up to 2^64 - 1.
lengths = st.one_of(st.integers(0, 200), st.sampled_from([frames.MAX_ABORT_BYTES, frames.MAX_ABORT_BYTES + 1,
                                                          HEADER_SIZE - 1, (1 << 28) + HEADER_SIZE + 1,
                                                          (1 << 31), (1 << 31) + 1, 1 << 40, 2**64 - 1]), u64)


def sealed(magic: bytes, version: int, kind: int, flags: int, group: int, epoch: int, op: int, tree: int,
           chunk: int, desc: int, length: int, checksum: int) -> bytes:
    """A 64-byte header with any fields and a right CRC: what gets past the CRC to the checks behind it."""
    body = struct.pack("<4sBBHIIQIIQQQ", magic, version, kind, flags, group, epoch, op, tree, chunk, desc, length,
                       checksum)
    return body + struct.pack("<I4x", zlib.crc32(body))


@st.composite
def hostile_headers(draw, group=None) -> bytes:
    """Headers with a right CRC and fields anywhere in range (the link's group now and then)."""
    return sealed(draw(st.sampled_from([frames.MAGIC, frames.MAGIC, b"CCF2", b"\0\0\0\0"])),
                  draw(st.sampled_from([frames.VERSION, frames.VERSION, 0, 255])),
                  draw(st.one_of(st.sampled_from(frames.KINDS), st.integers(0, 255))),
                  draw(st.one_of(st.just(0), st.integers(0, 65535))),
                  draw(st.one_of(st.just(group), u32) if group is not None else u32),
                  draw(st.one_of(st.just(0), u32)), draw(st.one_of(st.integers(0, 3), u64)),
                  draw(st.one_of(st.integers(0, 3), u32)), draw(st.one_of(st.integers(0, 3), u32)), draw(u64),
                  draw(lengths), draw(u64))


@st.composite
def valid_frames(draw, group: int = GROUP) -> tuple[Header, bytes]:
    """A well-formed frame of ``group`` at epoch 0: DATA mostly, for op 1 mostly (see feed_link)."""
    payload = draw(st.binary(max_size=300))
    kind = draw(st.one_of(st.just(frames.DATA), st.sampled_from(frames.KINDS)))
    if kind == frames.DATA:
        op = draw(st.sampled_from([1, 1, 0, 2]))
        return frames.data_header(group, 0, op, 0, draw(st.integers(0, 3)), 7, payload), payload
    if kind == frames.ABORT:
        text = draw(st.text(max_size=100)).encode()[:frames.MAX_ABORT_BYTES]
        return Header(kind, group, 0, draw(st.integers(0, 3)), length=len(text)), text
    if kind == frames.RELAY:
        inner = frames.data_header(group, 0, 0, 0, 0, 7, payload)
        return Header(kind, group, 0, 0, length=HEADER_SIZE + len(payload)), inner.pack() + payload
    return Header(kind, group, 0, draw(st.integers(0, 3)), chunk=draw(st.integers(0, 3))), b""


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    """``raw`` with some bytes flipped, overwritten, cut off or added."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "set", "cut", "add"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if how == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# ------------------------------------------------------------------------------------ in this process
def check_header_bytes(raw: bytes) -> None:
    """Decodes to a header within the kinds' bounds, or raises ProtocolError (nothing else)."""
    try:
        h = frames.unpack_header(raw)
    except ProtocolError as e:
        assert "\n" not in str(e)
        return
    assert len(raw) == HEADER_SIZE and raw[:4] == frames.MAGIC
    assert h.kind in frames.KINDS and Header(*h).pack()[:60] == bytes(raw[:60])
    assert h.kind != frames.ABORT or h.length <= frames.MAX_ABORT_BYTES
    assert h.kind not in frames.CONTROL or h.length == 0
    assert h.kind != frames.RELAY or h.length >= HEADER_SIZE


def check_mutated_header(header: Header, raw: bytes) -> None:
    """A valid header with bytes changed is refused (its CRC), unless only the pad changed."""
    original = header.pack()
    try:
        got = frames.unpack_header(raw)
    except ProtocolError:
        return
    # CRC-32 misses a change of the 60 checked bytes with odds of 2^-32: only the pad may differ.
    assert len(raw) == HEADER_SIZE and raw[:60] == original[:60] and got == header


@SHORT
@given(st.binary(max_size=2 * HEADER_SIZE))
def test_arbitrary_bytes_decode_to_a_header_or_raise_protocol_error(raw):
    check_header_bytes(raw)


@SHORT
@given(hostile_headers())
def test_headers_with_a_right_crc_and_any_fields_decode_within_bounds_or_raise(raw):
    check_header_bytes(raw)


@SHORT
@given(st.data())
def test_a_mutated_valid_header_is_refused(data):
    header, _ = data.draw(valid_frames())
    check_mutated_header(header, data.draw(mutated(header.pack())))


def test_a_header_claiming_2_to_the_40_bytes_decodes_without_allocating_and_abort_ones_are_refused():
    tracemalloc.start()
    try:
        h = frames.unpack_header(sealed(frames.MAGIC, 1, frames.DATA, 0, GROUP, 0, 0, 0, 0, 0, 1 << 40, 0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert h.length == 1 << 40 and peak < 1 << 20  # the link refuses it: past MAX_FRAME (below)
    for kind, length in ((frames.ABORT, 1 << 40), (frames.ACK, 1), (frames.RELAY, 10)):
        with pytest.raises(ProtocolError):
            frames.unpack_header(sealed(frames.MAGIC, 1, kind, 0, GROUP, 0, 0, 0, 0, 0, length, 0))


def check_hello_bytes(raw: bytes) -> None:
    try:
        hello = frames.unpack_hello(raw)
    except ProtocolError:
        return
    packed = hello.pack()
    assert len(raw) == frames.HELLO_SIZE and packed[:6] == raw[:6] and packed[8:] == raw[8:]  # (2 pad bytes)


@SHORT
@given(st.one_of(st.binary(max_size=2 * frames.HELLO_SIZE),
                 st.builds(lambda tail: frames.HANDSHAKE_MAGIC + bytes([frames.VERSION]) + tail,
                           st.binary(min_size=frames.HELLO_SIZE - 5, max_size=frames.HELLO_SIZE - 5))))
def test_arbitrary_bytes_decode_to_a_hello_or_raise_protocol_error(raw):
    check_hello_bytes(raw)


@SHORT
@given(st.one_of(st.text(max_size=300),
                 st.builds(lambda k, r, m: f"{k}|{r}|{m}",
                           st.sampled_from(["mismatch", "timeout", "corrupt", "link", "failure", "", "x"]),
                           st.one_of(st.integers(-10, 10).map(str), st.text(max_size=20), st.just("9" * 4000)),
                           st.text(max_size=200))))
def test_any_abort_text_becomes_a_typed_error(text):
    """An ABORT frame's payload (at most 4096 bytes) is a peer's word: it always becomes one of
    the library's errors, whose rank (if any) is an integer."""
    error = frames.error_from_abort(text, reporter=3)
    assert isinstance(error, CollectiveError)
    assert getattr(error, "rank", None) is None or isinstance(error.rank, int)


# ------------------------------------------------------------------------------------ a real link
def _heap_peak_during(fn) -> int:
    """How far the traced Python heap rose above where it started while ``fn`` ran (every thread)."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


class _Errors(logging.Handler):
    """Collects ERROR records (the receiver's last resort: ``log.exception`` of a bug)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def feed_link(wire: bytes) -> None:
    """Write ``wire`` into rank 0's established connection to rank 1 (op 0 is finished, so its
    frames are read and dropped; op 1 has a receiver of 300 bytes; later ones wait for theirs)
    and let rank 1 read it."""
    from linkpair import Box, links, transports

    errors = _Errors()
    logging.getLogger("collcomm").addHandler(errors)
    a, b = transports()
    try:
        la, lb = links(a, b)
        box = Box(300)
        mailbox = b.mailbox(GROUP)
        mailbox.register(0, Box(1))
        mailbox.finish(0)
        mailbox.register(1, box)

        def inject():
            with la._send_lock:  # the bytes go in between two of the sender's frames
                la.sock.sendall(wire)
            # Until rank 1 read it all (or failed, or delivered), and a moment for what follows;
            # a frame of an operation not started yet stays unread (at most 0.3 s here).
            _wait(lambda: lb.error is not None or box.arrived.is_set() or not _unread(lb.sock), 0.3)
            time.sleep(0.02)

        peak = _heap_peak_during(inject)
        assert peak < HEAP_BOUND, f"rank 1 allocated {peak} bytes reading {len(wire)} hostile bytes"
        assert lb.error is None or isinstance(lb.error, CollectiveError), repr(lb.error)
        if box.arrived.is_set() and box.error is None:  # delivered: its checksum covered it
            h = frames.unpack_header(wire[:HEADER_SIZE])
            assert h.kind == frames.DATA and not h.flags & frames.NO_CHECKSUM and h.op == 1
            assert frames.checksum(bytes(box.buf[:h.length])) == h.checksum
            assert bytes(box.buf[:h.length]) == wire[HEADER_SIZE:HEADER_SIZE + h.length]
    finally:
        b.close()  # first: rank 0's reconnection attempt then meets a closed listener at once
        a.close()
        logging.getLogger("collcomm").removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


@st.composite
def link_input(draw) -> bytes:
    which = draw(st.sampled_from(["random", "hostile", "mutated", "valid"]))
    if which == "random":
        return draw(st.binary(min_size=1, max_size=300))
    if which == "hostile":
        return draw(hostile_headers(group=GROUP)) + draw(st.binary(max_size=300))
    header, payload = draw(valid_frames())
    raw = header.pack() + payload
    return raw if which == "valid" else draw(mutated(raw))


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(link_input())
def test_a_link_fed_arbitrary_bytes_delivers_nothing_unchecked_and_allocates_nothing_on_their_word(wire):
    feed_link(wire)


@pytest.mark.timeout(60)
def test_a_link_fed_a_header_claiming_2_to_the_40_bytes_fails_with_a_protocol_error():
    from linkpair import links, transports

    a, b = transports()
    try:
        la, lb = links(a, b)
        wire = sealed(frames.MAGIC, 1, frames.DATA, 0, GROUP, 0, 0, 0, 0, 0, 1 << 40, 0)
        peak = _heap_peak_during(lambda: (la.sock.sendall(wire), _wait(lambda: lb.error is not None, 5)))
        assert isinstance(lb.error, ProtocolError) and "exceeds" in str(lb.error), repr(lb.error)
        assert peak < HEAP_BOUND
    finally:
        b.close()
        a.close()


def _unread(sock: socket.socket) -> int:
    """Bytes that arrived on ``sock`` and were not read yet."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:  # closed
        return 0


def _wait(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------------------------ abort frames
def test_aborts_for_operations_not_started_are_kept_within_bounds(caplog):
    """A peer's ABORT frames name any operation: those kept for operations not started here are
    at most MAX_EARLY_ABORTS, the nearest ones, the first per operation, less than ABORT_WINDOW
    ahead; the rest are dropped, counted and logged in a few lines."""
    from linkpair import Box

    from collcomm.transport import mailbox as mb

    box = mb.GroupMailbox(9001)  # a group of its own: the refusal log is the process's
    box.register(0, Box(1))
    box.finish(0)  # the floor is 1
    first = CollectiveError("the first abort of operation 1")
    answers = [box.abort(1, first), box.abort(1, CollectiveError("an echo"))]  # the first stays
    with caplog.at_level(logging.INFO, logger="collcomm.transport"):
        answers += [box.abort(op, CollectiveError(f"abort {op}")) for op in range(2, 200_000)]
    assert len(box._aborts) == mb.MAX_EARLY_ABORTS, len(box._aborts)
    assert answers.count(True) == mb.MAX_EARLY_ABORTS + 1 and answers[:2] == [True, True]
    assert box.dropped_aborts == 200_000 - 1 - mb.MAX_EARLY_ABORTS
    lines = [r.getMessage() for r in caplog.records if "abort" in r.getMessage()]
    assert 1 <= len(lines) <= 2 and "dropped an abort of operation" in lines[0], lines
    assert box.abort(mb.MAX_EARLY_ABORTS + 5, CollectiveError("no room")) is False  # farther than all kept
    # A nearer operation's abort takes the place of the farthest one kept.
    box._aborts.pop(1)
    assert box.abort(70, CollectiveError("abort 70")) and box.abort(1, first) and 70 not in box._aborts
    # The legitimate ones still arrive: each operation that starts gets its own abort at once.
    for op in (1, 2, mb.MAX_EARLY_ABORTS):
        r = Box(1)
        box.register(op, r)
        assert r.error is first if op == 1 else str(r.error) == f"abort {op}", (op, r.error)
        box.finish(op)
    assert not box.abort(box.floor + mb.ABORT_WINDOW, CollectiveError("far ahead"))
    assert box.abort(box.floor + mb.ABORT_WINDOW - 1, CollectiveError("within the window"))


@pytest.mark.timeout(60)
def test_a_peer_sending_aborts_for_ever_new_operations_grows_nothing():
    """Rank 0 sends 5,000 ABORT frames, each for a new operation, over a real link: rank 1 keeps
    at most MAX_EARLY_ABORTS of them, its heap barely moves, and the link stays up."""
    from linkpair import Box, links, transports

    from collcomm.transport import mailbox as mb

    n = 5000
    a, b = transports()
    try:
        la, lb = links(a, b)
        box = b.mailbox(GROUP)

        def storm():
            for op in range(1, n + 1):
                la.abort(op, CollectiveError("x" * 200))
            assert _wait(lambda: getattr(box, "dropped_aborts", 0) + len(box._aborts) >= n, 30)

        peak = _heap_peak_during(storm)
        assert len(box._aborts) == mb.MAX_EARLY_ABORTS, f"{len(box._aborts)} aborts kept"
        assert box.dropped_aborts == n - mb.MAX_EARLY_ABORTS
        assert peak < HEAP_BOUND and lb.error is None and la.error is None
        r = Box(1)
        box.register(1, r)  # operation 1's abort was kept: it fails at once with the peer's word
        assert isinstance(r.error, CollectiveError) and "x" * 200 in str(r.error)
    finally:
        b.close()
        a.close()


# ------------------------------------------------------------------------------------ the handshake
def serve_bytes(data: bytes, auth_frames: bool) -> BaseException:
    """The accepting side of the handshake (rank 1) fed ``data`` then the end of the stream:
    the error it raises (it must raise: nobody proves the token without it)."""
    server, client = socket.socketpair()
    try:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        try:
            handshake.server_handshake(server, TOKEN, 1, auth_frames)
        except (ProtocolError, AuthenticationError, OSError) as e:
            return e
        raise AssertionError(f"the handshake accepted {data!r}")
    finally:
        server.close()
        client.close()


def answer_bytes(data: bytes) -> BaseException:
    """The connecting side of the handshake (rank 0 to rank 1) answered with ``data``."""
    client, server = socket.socketpair()
    try:
        server.sendall(data)
        server.shutdown(socket.SHUT_WR)
        try:
            handshake.client_handshake(client, TOKEN, 0, 1, GROUP, 0, deadline=time.monotonic() + 2)
        except (ProtocolError, AuthenticationError, OSError) as e:
            return e
        raise AssertionError(f"the handshake accepted a server that answered {data!r}")
    finally:
        client.close()
        server.close()


@st.composite
def hello_then_bytes(draw, server: int = 1) -> bytes:
    """A well-formed hello (to ``server`` mostly, any flags) and then anything, or arbitrary bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    hello = frames.Hello(draw(st.integers(0, 3)), draw(st.one_of(st.just(server), u32)), draw(u32), draw(u32),
                         draw(st.binary(min_size=16, max_size=16)), draw(st.integers(0, 255)))
    return hello.pack() + draw(st.binary(max_size=2 * frames.MAC_SIZE))


def check_served(data: bytes, auth_frames: bool) -> None:
    error = serve_bytes(data, auth_frames)
    if len(data) >= frames.HELLO_SIZE + frames.MAC_SIZE and data[:4] == frames.HANDSHAKE_MAGIC and \
            data[4] == frames.VERSION and struct.unpack_from("<I", data, 12)[0] == 1:
        assert isinstance(error, AuthenticationError), repr(error)  # a whole attempt: a wrong proof
    assert "\n" not in str(error)


@SHORT
@given(hello_then_bytes(), st.booleans())
def test_the_accepting_side_of_the_handshake_refuses_any_bytes_with_a_typed_error(data, auth_frames):
    check_served(data, auth_frames)


@SHORT
@given(st.binary(max_size=2 * frames.CHALLENGE_SIZE))
def test_the_connecting_side_of_the_handshake_refuses_any_answer_with_a_typed_error(data):
    error = answer_bytes(data)
    if len(data) >= frames.CHALLENGE_SIZE:
        assert isinstance(error, AuthenticationError) and "could not prove" in str(error), repr(error)


def knock_listener(address: str, data: bytes, unix: bool) -> bytes:
    """Connect to a listener, send ``data``, end the stream; what the listener sent back before
    it closed the connection."""
    host, port, local = split_address(address)
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect("\0" + local)
    else:
        sock = socket.create_connection((host, port))
    sock.settimeout(10)
    got = b""
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # refused before all was said
            pass
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    finally:
        sock.close()
    return got


def fuzz_listeners(examples: settings) -> None:
    """Rank 1's real TCP and Unix listeners get arbitrary connections; each is closed having been
    told nothing but (for a well-formed hello to rank 1) the 48-byte challenge, never accepted; then
    rank 0, which holds the token, links to rank 1 and its frame arrives."""
    from linkpair import Box, links, transports

    a, b = transports()
    seen = {"knocks": 0}
    try:
        @examples
        @given(hello_then_bytes(), st.booleans())
        def knock(data, unix):
            got = knock_listener(b.address, data, unix)
            assert got in (b"", ) or (len(got) == frames.CHALLENGE_SIZE and data[:4] == frames.HANDSHAKE_MAGIC), got
            seen["knocks"] += 1

        knock()
        assert seen["knocks"] > 0
        la, lb = links(a, b)
        box, payload = Box(1000), os.urandom(1000)
        b.mailbox(GROUP).register(0, box)
        la.send(frames.data_header(GROUP, 0, 0, 0, 0, 0, payload), memoryview(payload))
        assert box.arrived.wait(10) and box.error is None and bytes(box.buf) == payload
        assert threading.active_count() < 100  # the refused connections' threads are gone
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(120)
def test_a_ranks_listeners_refuse_arbitrary_connections_and_still_let_a_correct_peer_in():
    fuzz_listeners(settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]))


# ------------------------------------------------------------------------------------ long runs
@pytest.mark.slow
@LONG
@given(st.one_of(st.binary(max_size=2 * HEADER_SIZE), hostile_headers()))
def test_long_header_bytes(raw):
    check_header_bytes(raw)


@pytest.mark.slow
@LONG
@given(st.data())
def test_long_mutated_headers(data):
    header, _ = data.draw(valid_frames())
    check_mutated_header(header, data.draw(mutated(header.pack())))


@pytest.mark.slow
@LONG
@given(hello_then_bytes(), st.booleans())
def test_long_handshake_accepting_side(data, auth_frames):
    check_served(data, auth_frames)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(link_input())
def test_long_link_input(wire):
    feed_link(wire)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_long_listeners():
    fuzz_listeners(settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]))


@pytest.mark.slow
@LONG
@given(st.binary(max_size=2 * frames.CHALLENGE_SIZE))
def test_long_handshake_connecting_side(data):
    error = answer_bytes(data)
    assert len(data) < frames.CHALLENGE_SIZE or isinstance(error, AuthenticationError), repr(error)
