"""What travels on the wire besides the messages of ``coordinator.proto``: metadata keys, the
status code of each kind of refusal, and conversions between messages and the plain values of
:mod:`collcomm.coordinator.state` (callers of the client never see protobuf objects)."""

from __future__ import annotations

import grpc

from collcomm.coordinator import coordinator_pb2 as pb
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
