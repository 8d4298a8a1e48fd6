"""The transport interface: what the runtime's executor and collectives may call on a transport.

A transport moves frames (:mod:`collcomm.transport.frames`) between ranks, with deadlines, and
knows nothing of trees, reductions or objects. TCP implements it today
(:class:`collcomm.transport.tcp.TcpTransport`); a shared-memory and an NCCL transport implement
the same surface. The runtime uses nothing else of a transport:

* a :class:`Transport` hands out one :class:`Link` per (peer, group) and one
  :class:`~collcomm.transport.mailbox.GroupMailbox` per group (per peer for point-to-point);
* an operation registers itself in the group's mailbox as a :class:`Receiver` and sends its
  pieces with :meth:`Link.send`; the transport asks the receiver where each arriving payload
  goes (:meth:`Receiver.destination`: a view of the user's buffer or of a scratch chunk, so
  payloads land in place) and tells it when one arrived whole or when the operation failed;
* a failure is told to the group with :meth:`Transport.abort_group`; a group that was shrunk
  is closed with :meth:`Transport.close_group`.

Group ids from :data:`P2P_BASE` on carry point-to-point messages (tag = id - P2P_BASE).

Two instruments plug into a transport without the transport importing them: the telemetry it
records its traffic in (:class:`collcomm.transport.telemetry.LinkTelemetry`), and a plan of
injected faults (:class:`FaultPlan`, implemented by :mod:`collcomm.faults.inject`) that its links
apply to what they send.
"""

from __future__ import annotations

from typing import Callable, Protocol

from collcomm.transport.frames import Header

P2P_BASE = 1 << 31  # group ids from here on carry point-to-point messages (tag = id - P2P_BASE)


class Receiver(Protocol):
    """What an operation gives the transport so frames can land in place."""

    def destination(self, header: Header, peer: int) -> memoryview:
        """Where the payload of ``header`` from world rank ``peer`` goes (exactly ``header.length``
        bytes); raise a CollectiveError (a MismatchError) for a frame this operation does not expect."""

    def delivered(self, header: Header, view: memoryview, peer: int) -> None:
        """The payload arrived whole in ``view`` (its checksum held)."""

    def failed(self, error: BaseException) -> None:
        """The operation failed (a lost peer, an abort from another rank, a closed group)."""


class Link(Protocol):
    """One connection to ``peer`` for one group, reliable and in order."""

    peer: int
    epoch: int

    @property
    def alive(self) -> bool: ...

    def sends_by_reference(self, n: int) -> bool:
        """Whether a point-to-point message of ``n`` bytes goes by reference: its ``done`` then runs
        once the peer read it, and it needs no checksum."""

    def revoke(self, op: int) -> None:
        """Operation (or message) ``op`` failed here, before its caller is told: payloads of it
        the peer has yet to read by reference must not be used there."""

    def payload_verified(self, n: int) -> bool:
        """Whether the link itself makes sure a payload of ``n`` bytes arrives as sent (frame MACs,
        or a collective's Unix socket between processes of one machine: no wire, and a payload
        read by reference is revoked when its operation fails): then a collective's DATA frame
        may leave out the payload checksum (:func:`collcomm.transport.frames.data_header`)."""

    def send(self, header: Header, payload: memoryview | None = None,
             done: Callable[[], None] | None = None) -> None:
        """Queue a frame; never blocks on the network. For a DATA frame of a collective ``done``
        runs once the peer has the payload whole (its source region is free again); for a
        point-to-point message once it left. Raises the link's error once it failed."""

    def abort(self, op: int, error: BaseException) -> None:
        """Tell the peer that operation ``op`` failed here (behind what is queued)."""


class Transport(Protocol):
    """One rank's endpoint: listens, authenticates peers, hands out links."""

    rank: int
    address: str  # what the rank registers with the coordinator; peers reach it there

    def set_peers(self, table: dict[int, str]) -> None:
        """The registered addresses of the other ranks (world rank -> address)."""

    def mailbox(self, group: int, peer: int | None = None):
        """The group's :class:`~collcomm.transport.mailbox.GroupMailbox` (per ``peer`` for
        point-to-point groups, whose pairs number their messages on their own)."""

    def link(self, peer: int, group: int, epoch: int, timeout: float,
             check: Callable[[], BaseException | None] | None = None) -> Link:
        """The connection to ``peer`` for ``group`` at ``epoch``: kept, or opened within
        ``timeout``; ``check`` (called about every quarter second while waiting) may report a
        failure known elsewhere, which is raised at once."""

    def abort_group(self, group: int, op: int, error: BaseException) -> None:
        """Operation ``op`` of ``group`` failed here: tell every connected member why."""

    def close_group(self, group: int, error: BaseException) -> None:
        """Close every connection of ``group`` and fail what waits in its mailbox with ``error``."""

    def close(self) -> None:
        """Close everything; the transport's threads end."""


class LinkFaults(Protocol):
    """Injected faults of one directed link, applied by its sending side."""

    def before_data(self, nbytes: int, corrupt: bool = True) -> str | None:
        """Before a DATA frame goes out: may sleep (delay, throttle); "drop", "corrupt" or None."""

    def corrupted(self, payload) -> bytearray:
        """A copy of ``payload`` with one byte changed."""

    def cut_after(self, nbytes: int) -> int | None:
        """How many bytes of a frame of ``nbytes`` go before the connection is cut (None: no cut)."""


class FaultPlan(Protocol):
    """A plan of injected faults (see :mod:`collcomm.faults.inject`)."""

    def for_link(self, src: int, dst: int) -> LinkFaults | None: ...
