"""The transport: moving frames between ranks, with deadlines, and nothing of trees or reductions.

- :mod:`.interface`: what the runtime may call on a transport (Transport, Link, Receiver) and the
  instruments a transport takes (a FaultPlan);
- :mod:`.frames`: the wire format (64-byte frame header, kinds, the token handshake's hello, the
  abort codec);
- :mod:`.mailbox`: which operation takes the frames that arrive for a group;
- :mod:`.telemetry`: what a transport records of its links' traffic (and the kernel's TCP counters);
- :mod:`.tcp`: the TCP transport (and local Unix sockets between ranks of one machine), with
  reliability, detours and optional per-frame MACs.

A shared-memory and an NCCL transport implement the same interface next to ``tcp``.
"""
