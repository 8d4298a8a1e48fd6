"""A small interpreter of MSCCL XML programs: the independent check of the exporter.

``parse`` reads the XML with xml.etree and insists on every attribute the MSCCL
runtime's parser reads; ``validate`` checks the rules that parser and the runtime
rely on (contiguous ids, one threadblock per connection, a receive for every send
with the same count, peers consistent with the steps, dependencies that point at
steps which signal); ``run`` executes every GPU's threadblocks, each in step order,
with messages matched first-in first-out per (sender, receiver, channel) and
dependencies honoured as the runtime does (a threadblock's flag is the index of its
last finished step with ``hasdep="1"``; a wait for step k passes once the flag is at
least k). No progress before every step ran is a deadlock.

``capacity`` is how many messages a connection holds before a send waits: None for
unbounded, 1 or more for that many, 0 for none at all (a message moves only while
its sender and receiver are both at that step, so a chain of fused steps moves as one).
A program that runs with capacity 0 runs with any buffering.

One run is one pass of the program; the runtime repeats it for every slice of the
chunks, which changes nothing about order or results. Step semantics (from the
runtime kernel): s sends src; r receives into dst; rcs receives into dst and sends it
on; rrs receives, adds src, sends; rrc receives, adds src, stores into dst; rrcs does
both; cpy copies src to dst; re adds src into dst; nop only waits.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

ALGO_ATTRS = ("name", "proto", "nchannels", "nchunksperloop", "ngpus", "coll", "inplace", "outofplace",
              "minBytes", "maxBytes")
GPU_ATTRS = ("id", "i_chunks", "o_chunks", "s_chunks")
TB_ATTRS = ("id", "send", "recv", "chan")
STEP_ATTRS = ("s", "type", "srcbuf", "srcoff", "dstbuf", "dstoff", "cnt", "depid", "deps", "hasdep")
COLLS = ("allgather", "reducescatter", "allreduce")
PROTOCOLS = ("Simple", "LL", "LL128")
SEND = {"s", "rcs", "rrs", "rrcs"}
RECV = {"r", "rcs", "rrs", "rrc", "rrcs"}
LOCAL = {"cpy", "re", "nop"}
USES_SRC = {"s", "rrs", "rrc", "rrcs", "cpy", "re"}
USES_DST = {"r", "rcs", "rrc", "rrcs", "cpy", "re"}
MAX_COUNT = 71      # the runtime rejects cnt >= 72
MAX_STEPS = 64      # MSCCL_MAX_NUM_STEPS of msccl-executor-nccl (older copies: 256)
MAX_CHANNELS = 32


class ProgramError(Exception):
    """The XML is not a well-formed MSCCL program."""


class Deadlock(Exception):
    """No step can make progress, yet some have not run."""


@dataclass
class Step:
    s: int
    type: str
    srcbuf: str
    srcoff: int
    dstbuf: str
    dstoff: int
    cnt: int
    depid: int
    deps: int
    hasdep: int


@dataclass
class Threadblock:
    id: int
    send: int
    recv: int
    chan: int
    steps: list[Step] = field(default_factory=list)


@dataclass
class Gpu:
    id: int
    i_chunks: int
    o_chunks: int
    s_chunks: int
    tbs: list[Threadblock] = field(default_factory=list)


@dataclass
class Program:
    attrs: dict[str, str]
    gpus: list[Gpu]

    @property
    def coll(self) -> str:
        return self.attrs["coll"]

    @property
    def ngpus(self) -> int:
        return int(self.attrs["ngpus"])

    @property
    def nchunksperloop(self) -> int:
        return int(self.attrs["nchunksperloop"])


# ---------------------------------------------------------------------------- parsing
def _ints(elem: ET.Element, names: tuple[str, ...], where: str, text: tuple[str, ...] = ()) -> dict:
    out = {}
    for name in names:
        if name not in elem.attrib:
            raise ProgramError(f"{where}: attribute {name!r} is missing")
        value = elem.attrib[name]
        if name in text:
            out[name] = value
            continue
        try:
            out[name] = int(value)
        except ValueError:
            raise ProgramError(f"{where}: attribute {name}={value!r} is not an integer") from None
    return out


def parse(text: str) -> Program:
    if text.lstrip().startswith("<?"):
        raise ProgramError("the MSCCL parser does not read an XML declaration")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ProgramError(f"not XML: {e}") from None
    if root.tag != "algo":
        raise ProgramError(f"top element is <{root.tag}>, expected <algo>")
    attrs = _ints(root, ALGO_ATTRS, "algo", text=("name", "proto", "coll"))
    gpus = []
    for g in root:
        if g.tag != "gpu":
            raise ProgramError(f"<algo> holds <{g.tag}>, expected <gpu>")
        gpu = Gpu(**_ints(g, GPU_ATTRS, "gpu"))
        for t in g:
            if t.tag != "tb":
                raise ProgramError(f"gpu {gpu.id} holds <{t.tag}>, expected <tb>")
            tb = Threadblock(**_ints(t, TB_ATTRS, f"gpu {gpu.id} tb"))
            for s in t:
                if s.tag != "step":
                    raise ProgramError(f"gpu {gpu.id} tb {tb.id} holds <{s.tag}>, expected <step>")
                tb.steps.append(Step(**_ints(s, STEP_ATTRS, f"gpu {gpu.id} tb {tb.id} step",
                                             text=("type", "srcbuf", "dstbuf"))))
            gpu.tbs.append(tb)
        gpus.append(gpu)
    return Program({k: str(v) for k, v in attrs.items()}, gpus)


# ---------------------------------------------------------------------------- validation
def _check_header(p: Program) -> None:
    a = p.attrs
    if a["proto"] not in PROTOCOLS:
        raise ProgramError(f"proto {a['proto']!r} is not one of {PROTOCOLS}")
    if a["coll"] not in COLLS:
        raise ProgramError(f"coll {a['coll']!r} is not one of {COLLS}")
    if not 1 <= int(a["nchannels"]) <= MAX_CHANNELS:
        raise ProgramError(f"nchannels {a['nchannels']} out of range")
    if a["inplace"] not in ("0", "1") or a["outofplace"] not in ("0", "1"):
        raise ProgramError("inplace and outofplace must be 0 or 1")
    if [g.id for g in p.gpus] != list(range(p.ngpus)):
        raise ProgramError(f"gpu ids {[g.id for g in p.gpus]} are not 0..{p.ngpus - 1} in order")
    n, c = p.ngpus, p.nchunksperloop
    if c % n:
        raise ProgramError(f"nchunksperloop {c} is not a multiple of ngpus {n}")
    want = {"allgather": (c // n, c), "reducescatter": (c, c // n), "allreduce": (c, c)}[p.coll]
    for g in p.gpus:
        if (g.i_chunks, g.o_chunks) != want:
            raise ProgramError(f"gpu {g.id}: i_chunks/o_chunks {g.i_chunks}/{g.o_chunks}, a {p.coll} of "
                               f"{c} chunks per loop needs {want[0]}/{want[1]}")
        if g.s_chunks < 0:
            raise ProgramError(f"gpu {g.id}: negative s_chunks")


def _check_step(p: Program, g: Gpu, tb: Threadblock, k: int, st: Step) -> None:
    where = f"gpu {g.id} tb {tb.id} step {k}"
    if st.s != k:
        raise ProgramError(f"{where}: s={st.s}, steps must be numbered 0, 1, 2, ...")
    if st.type not in SEND | RECV | LOCAL:
        raise ProgramError(f"{where}: unknown type {st.type!r}")
    if st.type in SEND and tb.send < 0:
        raise ProgramError(f"{where}: {st.type} in a threadblock without a send peer")
    if st.type in RECV and tb.recv < 0:
        raise ProgramError(f"{where}: {st.type} in a threadblock without a recv peer")
    if st.type != "nop":
        if not 1 <= st.cnt <= MAX_COUNT:
            raise ProgramError(f"{where}: cnt {st.cnt} outside 1..{MAX_COUNT}")
        sizes = {"i": g.i_chunks, "o": g.o_chunks, "s": g.s_chunks}
        for used, buf, off in ((st.type in USES_SRC, st.srcbuf, st.srcoff),
                               (st.type in USES_DST, st.dstbuf, st.dstoff)):
            if buf not in sizes:
                raise ProgramError(f"{where}: unknown buffer {buf!r}")
            if used and not (0 <= off and off + st.cnt <= sizes[buf]):
                raise ProgramError(f"{where}: chunks {off}..{off + st.cnt - 1} outside buffer {buf} "
                                   f"of {sizes[buf]}")
    if st.hasdep not in (0, 1):
        raise ProgramError(f"{where}: hasdep must be 0 or 1")
    if st.depid == -1:
        if st.type == "nop":
            raise ProgramError(f"{where}: a nop without a dependency")
        if k > 0 and tb.steps[k - 1].type == "nop":
            raise ProgramError(f"{where}: follows a nop, so it must have a dependency of its own")
        return
    if not 0 <= st.depid < len(g.tbs) or st.depid == tb.id:
        raise ProgramError(f"{where}: depid {st.depid} is not another threadblock of gpu {g.id}")
    target = g.tbs[st.depid].steps
    if not 0 <= st.deps < len(target):
        raise ProgramError(f"{where}: deps {st.deps} is not a step of tb {st.depid}")
    if target[st.deps].type == "nop" or target[st.deps].hasdep != 1:
        raise ProgramError(f"{where}: waits for tb {st.depid} step {st.deps}, which does not signal (hasdep)")


def validate(p: Program) -> None:
    """Raise ProgramError at the first rule the program breaks."""
    _check_header(p)
    nchan = int(p.attrs["nchannels"])
    receivers: dict[tuple[int, int, int], Threadblock] = {}
    senders: dict[tuple[int, int, int], Threadblock] = {}
    for g in p.gpus:
        if [tb.id for tb in g.tbs] != list(range(len(g.tbs))):
            raise ProgramError(f"gpu {g.id}: tb ids {[tb.id for tb in g.tbs]} are not 0, 1, 2, ...")
        for tb in g.tbs:
            where = f"gpu {g.id} tb {tb.id}"
            if not 0 <= tb.chan < nchan:
                raise ProgramError(f"{where}: channel {tb.chan} outside 0..{nchan - 1}")
            for peer in (tb.send, tb.recv):
                if peer == g.id or not -1 <= peer < p.ngpus:
                    raise ProgramError(f"{where}: peer {peer} is not another gpu")
            if len(tb.steps) > MAX_STEPS:
                raise ProgramError(f"{where}: {len(tb.steps)} steps, the runtime holds {MAX_STEPS}")
            if (tb.send >= 0) != any(st.type in SEND for st in tb.steps):
                raise ProgramError(f"{where}: send peer {tb.send} does not match its steps")
            if (tb.recv >= 0) != any(st.type in RECV for st in tb.steps):
                raise ProgramError(f"{where}: recv peer {tb.recv} does not match its steps")
            if tb.send >= 0:
                if (g.id, tb.send, tb.chan) in senders:
                    raise ProgramError(f"{where}: a second threadblock sending to {tb.send} on channel {tb.chan}")
                senders[g.id, tb.send, tb.chan] = tb
            if tb.recv >= 0:
                if (tb.recv, g.id, tb.chan) in receivers:
                    raise ProgramError(f"{where}: a second threadblock receiving from {tb.recv} on "
                                       f"channel {tb.chan}")
                receivers[tb.recv, g.id, tb.chan] = tb
            for k, st in enumerate(tb.steps):
                _check_step(p, g, tb, k, st)
    for conn in sorted(set(senders) | set(receivers)):
        if conn not in senders or conn not in receivers:
            raise ProgramError(f"connection {conn[0]} -> {conn[1]} on channel {conn[2]} has a "
                               f"{'sender' if conn in senders else 'receiver'} only")
        sent = [st.cnt for st in senders[conn].steps if st.type in SEND]
        got = [st.cnt for st in receivers[conn].steps if st.type in RECV]
        if sent != got:
            raise ProgramError(f"connection {conn[0]} -> {conn[1]} on channel {conn[2]}: sends of {sent} "
                               f"chunks, receives of {got}")


# ---------------------------------------------------------------------------- execution
class _Machine:
    def __init__(self, p: Program, buffers: list[dict[str, np.ndarray]], capacity: int | None):
        self.p, self.buffers, self.capacity = p, buffers, capacity
        self.pc = {(g.id, tb.id): 0 for g in p.gpus for tb in g.tbs}
        self.flag = {(g.id, tb.id): -1 for g in p.gpus for tb in g.tbs}
        self.fifo: dict[tuple[int, int, int], deque] = defaultdict(deque)
        self.recv_tb = {(tb.recv, g.id, tb.chan): (g.id, tb) for g in p.gpus for tb in g.tbs if tb.recv >= 0}

    def head(self, gid: int, tb: Threadblock) -> Step | None:
        k = self.pc[gid, tb.id]
        return tb.steps[k] if k < len(tb.steps) else None

    def dep_ok(self, gid: int, st: Step) -> bool:
        return st.depid < 0 or self.flag[gid, st.depid] >= st.deps

    def view(self, gid: int, buf: str, off: int, cnt: int) -> np.ndarray:
        return self.buffers[gid][buf][off:off + cnt]

    def execute(self, gid: int, st: Step, incoming: np.ndarray | None) -> np.ndarray | None:
        """Do the local part of a step; return what it sends (or None)."""
        src = self.view(gid, st.srcbuf, st.srcoff, st.cnt) if st.type in USES_SRC else None
        value = None
        if st.type == "s":
            value = src.copy()
        elif st.type in ("r", "rcs"):
            value = incoming
        elif st.type in ("rrs", "rrc", "rrcs"):
            value = incoming + src
        elif st.type == "cpy":
            value = src.copy()
        elif st.type == "re":
            value = self.view(gid, st.dstbuf, st.dstoff, st.cnt) + src
        if st.type in USES_DST:
            self.view(gid, st.dstbuf, st.dstoff, st.cnt)[...] = value
        return value if st.type in SEND else None

    def finish(self, gid: int, tb: Threadblock, st: Step) -> None:
        if st.hasdep and st.type != "nop":
            self.flag[gid, tb.id] = st.s
        self.pc[gid, tb.id] += 1

    # -- buffered connections
    def try_buffered(self, gid: int, tb: Threadblock) -> bool:
        st = self.head(gid, tb)
        if st is None or not self.dep_ok(gid, st):
            return False
        incoming = None
        if st.type in RECV:
            q = self.fifo[tb.recv, gid, tb.chan]
            if not q:
                return False
            if q[0].shape[0] != st.cnt:
                raise ProgramError(f"gpu {gid} tb {tb.id} step {st.s} receives {st.cnt} chunks, "
                                   f"the message has {q[0].shape[0]}")
        if st.type in SEND and self.capacity is not None and \
                len(self.fifo[gid, tb.send, tb.chan]) >= self.capacity:
            return False
        if st.type in RECV:
            incoming = self.fifo[tb.recv, gid, tb.chan].popleft()
        out = self.execute(gid, st, incoming)
        if st.type in SEND:
            self.fifo[gid, tb.send, tb.chan].append(out)
        self.finish(gid, tb, st)
        return True

    # -- no buffering: a chain of steps joined by messages moves together
    def try_rendezvous(self, gid: int, tb: Threadblock) -> bool:
        st = self.head(gid, tb)
        if st is None or not self.dep_ok(gid, st) or st.type in RECV:
            return False  # receives move with the chain that starts at their sender
        chain = [(gid, tb, st)]
        while chain[-1][2].type in SEND:
            g, t, s = chain[-1]
            if len(chain) > len(self.pc):
                return False  # a cycle of fused steps can never start
            entry = self.recv_tb.get((g, t.send, t.chan))
            if entry is None:
                raise ProgramError(f"gpu {g} tb {t.id} sends to {t.send} on channel {t.chan}, nobody receives")
            rg, rtb = entry
            rst = self.head(rg, rtb)
            if rst is None or rst.type not in RECV or not self.dep_ok(rg, rst):
                return False
            if rst.cnt != s.cnt:
                raise ProgramError(f"gpu {rg} tb {rtb.id} step {rst.s} receives {rst.cnt} chunks, "
                                   f"gpu {g} sends {s.cnt}")
            chain.append((rg, rtb, rst))
        value = None
        for g, t, s in chain:
            value = self.execute(g, s, value)
            self.finish(g, t, s)
        return True

    def run(self) -> None:
        step = self.try_rendezvous if self.capacity == 0 else self.try_buffered
        tbs = [(g.id, tb) for g in self.p.gpus for tb in g.tbs]
        progress = True
        while progress:
            progress = False
            for gid, tb in tbs:
                while step(gid, tb):
                    progress = True
        stuck = [(gid, tb.id, self.head(gid, tb)) for gid, tb in tbs if self.head(gid, tb) is not None]
        if stuck:
            shown = ", ".join(f"gpu {g} tb {t} step {s.s} ({s.type})" for g, t, s in stuck[:6])
            raise Deadlock(f"{len(stuck)} threadblocks cannot go on: {shown}")
        left = {conn: len(q) for conn, q in self.fifo.items() if q}
        if left:
            raise ProgramError(f"messages never received: {left}")


def _buffers(p: Program, inputs: list[np.ndarray], inplace: bool, rng: np.random.Generator):
    """Per GPU 'i', 'o', 's' arrays of shape (chunks, elements per chunk); output and scratch
    start as noise so that reading them before writing shows."""
    n = p.ngpus
    if len(inputs) != n:
        raise ValueError(f"{len(inputs)} inputs for {n} gpus")
    buffers = []
    for g, x in zip(p.gpus, inputs):
        x = np.asarray(x)
        if x.ndim != 1 or x.size % g.i_chunks:
            raise ValueError(f"gpu {g.id}: input of {x.size} elements is not {g.i_chunks} equal chunks")
        m = x.size // g.i_chunks
        noise = lambda chunks: rng.integers(-10**6, 10**6, size=(chunks, m)).astype(x.dtype)  # noqa: E731
        scratch = noise(g.s_chunks)
        if not inplace:
            buffers.append({"i": x.reshape(-1, m).copy(), "o": noise(g.o_chunks), "s": scratch})
        elif p.coll == "allgather":  # the input is the rank's block of the output
            out = noise(g.o_chunks)
            out[g.id * g.i_chunks:(g.id + 1) * g.i_chunks] = x.reshape(-1, m)
            buffers.append({"i": out[g.id * g.i_chunks:(g.id + 1) * g.i_chunks], "o": out, "s": scratch})
        elif p.coll == "reducescatter":  # the output is the rank's block of the input
            inp = x.reshape(-1, m).copy()
            buffers.append({"i": inp, "o": inp[g.id * g.o_chunks:(g.id + 1) * g.o_chunks], "s": scratch})
        else:  # allreduce: one buffer
            inp = x.reshape(-1, m).copy()
            buffers.append({"i": inp, "o": inp, "s": scratch})
    return buffers


def run(p: Program | str, inputs: list[np.ndarray], inplace: bool = False, capacity: int | None = None,
        seed: int = 0) -> list[np.ndarray]:
    """Validate and execute ``p`` on the per-GPU ``inputs`` (1-D arrays of i_chunks equal chunks);
    return every GPU's output buffer, flattened. Raises ProgramError or Deadlock."""
    if isinstance(p, str):
        p = parse(p)
    validate(p)
    if inplace and p.attrs["inplace"] != "1" or not inplace and p.attrs["outofplace"] != "1":
        raise ProgramError(f"the program does not claim to run {'in place' if inplace else 'out of place'}")
    buffers = _buffers(p, inputs, inplace, np.random.default_rng(seed))
    _Machine(p, buffers, capacity).run()
    return [b["o"].reshape(-1).copy() for b in buffers]
