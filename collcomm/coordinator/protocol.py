"""What travels on the wire besides the messages of ``coordinator.proto``: metadata keys, the
status code of each kind of refusal, and conversions between messages and the plain values of
:mod:`collcomm.coordinator.state` (callers of the client never see protobuf objects)."""

from __future__ import annotations

import grpc

from collcomm.coordinator import coordinator_pb2 as pb
from collcomm.coordinator import objects as ob
from collcomm.coordinator import state as st

TOKEN_KEY = "collcomm-token"        # request metadata: the job token
ERROR_KIND_KEY = "collcomm-error"   # trailing metadata of a refusal: its kind
ERROR_RANK_KEY = "collcomm-rank"    # trailing metadata of a refusal: the rank concerned

TIMEOUT = "timeout"
SHUTDOWN = "shutdown"

STATUS_OF_KIND = {
    st.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    st.MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    st.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    st.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    st.PEER_FAILURE: grpc.StatusCode.ABORTED,
    SHUTDOWN: grpc.StatusCode.ABORTED,
    TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ob.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ob.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ob.DELETED: grpc.StatusCode.NOT_FOUND,
    ob.LOST: grpc.StatusCode.DATA_LOSS,
    ob.FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def check_token(token: str) -> str:
    """The token, if it can travel as gRPC metadata (non-empty printable ASCII, no spaces)."""
    if not isinstance(token, str) or not token or not all(33 <= ord(c) < 127 for c in token):
        raise ValueError("the job token must be a non-empty string of printable ASCII without spaces")
    return token


def peer_table_to_pb(table: st.PeerTable) -> pb.RegisterResponse:
    return pb.RegisterResponse(
        peers=[pb.Peer(rank=p.rank, address=p.address, hostname=p.hostname, pid=p.pid)
               for p in table.peers],
        epoch=table.epoch)


def peer_table_from_pb(msg: pb.RegisterResponse) -> st.PeerTable:
    return st.PeerTable(tuple(st.Peer(p.rank, p.address, p.hostname, p.pid) for p in msg.peers),
                        msg.epoch)


def group_to_pb(info: st.GroupInfo) -> pb.GroupStatusResponse:
    return pb.GroupStatusResponse(
        group_id=info.group_id, name=info.name, epoch=info.epoch, members=info.members,
        dead=[pb.DeadRank(rank=d.rank, reason=d.reason, reporter_rank=d.reporter) for d in info.dead])


def group_from_pb(msg: pb.GroupStatusResponse) -> st.GroupInfo:
    return st.GroupInfo(msg.group_id, msg.name, msg.epoch, tuple(msg.members),
                        tuple(st.DeadRank(d.rank, d.reason, d.reporter_rank) for d in msg.dead))


def failure_to_pb(outcome: st.FailureOutcome) -> pb.ReportFailureResponse:
    return pb.ReportFailureResponse(
        newly_dead=outcome.newly_dead,
        bumped=[pb.GroupEpoch(group_id=g, epoch=e) for g, e in outcome.bumped])


def failure_from_pb(msg: pb.ReportFailureResponse) -> st.FailureOutcome:
    return st.FailureOutcome(msg.newly_dead, tuple((b.group_id, b.epoch) for b in msg.bumped))


# ------------------------------------------------------------------------------- objects
def holder_to_pb(h: ob.Holder) -> pb.ObjectHolder:
    return pb.ObjectHolder(rank=h.rank, address=h.address, host=h.host, box=h.box)


def holder_from_pb(m: pb.ObjectHolder) -> ob.Holder:
    return ob.Holder(m.rank, m.address, m.host, m.box)


def meta_to_pb(meta: ob.Meta) -> pb.ObjectMeta:
    return pb.ObjectMeta(size=meta.size, dtype=meta.dtype, shape=list(meta.shape))


def meta_from_pb(m: pb.ObjectMeta) -> ob.Meta:
    return ob.Meta(m.size, m.dtype, tuple(m.shape))


def location_to_pb(loc: ob.LocationView) -> pb.ObjectLocation:
    return pb.ObjectLocation(holder=holder_to_pb(loc.holder), complete=loc.complete,
                             parent=-1 if loc.parent is None else loc.parent, children=loc.children)


def location_from_pb(m: pb.ObjectLocation) -> ob.LocationView:
    return ob.LocationView(holder_from_pb(m.holder), m.complete, None if m.parent < 0 else m.parent,
                           m.children)


def info_to_pb(info: ob.Info) -> pb.ObjectInfoResponse:
    return pb.ObjectInfoResponse(key=info.key, meta=meta_to_pb(info.meta), inline=info.inline is not None,
                                 data=info.inline or b"", locations=[location_to_pb(l) for l in info.locations])


def info_from_pb(m: pb.ObjectInfoResponse) -> ob.Info:
    return ob.Info(m.key, meta_from_pb(m.meta), bytes(m.data) if m.inline else None,
                   tuple(location_from_pb(l) for l in m.locations))


def source_to_pb(src: ob.Source) -> pb.ObjectLocateResponse:
    return pb.ObjectLocateResponse(meta=meta_to_pb(src.meta), inline=src.inline is not None,
                                   data=src.inline or b"",
                                   source=location_to_pb(src.source) if src.source else None)


def source_from_pb(m: pb.ObjectLocateResponse) -> ob.Source:
    return ob.Source(meta_from_pb(m.meta), bytes(m.data) if m.inline else None,
                     location_from_pb(m.source) if m.HasField("source") else None)
