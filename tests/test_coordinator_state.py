"""The coordinator's decisions, without a network: registration, groups, epochs, failures, KV."""

from __future__ import annotations

import pytest

from collcomm.coordinator.state import (EXISTS, INVALID, MISMATCH, NOT_FOUND, PEER_FAILURE,
                                        CoordinatorState, FailureOutcome, FormationTicket, GroupInfo,
                                        PeerTable, Refusal, Waiting, name_ranks, one_line,
                                        parse_address, seconds)

pytestmark = pytest.mark.timeout(30)


def registered(world_size: int) -> CoordinatorState:
    state = CoordinatorState()
    for r in range(world_size):
        assert state.register(r, world_size, f"127.0.0.1:{4000 + r}", "box", 100 + r) is None
    return state


def formed(state: CoordinatorState, name: str, members) -> GroupInfo:
    tickets = [state.join_group(name, members, r) for r in members]
    outcome = state.formation_outcome(tickets[-1])
    assert isinstance(outcome, GroupInfo), outcome
    return outcome


# ------------------------------------------------------------------------------ helpers
def test_name_ranks_collapses_runs():
    assert name_ranks([2]) == "rank 2"
    assert name_ranks([7, 0, 1, 2, 3, 9]) == "ranks 0-3, 7, 9"


def test_one_line_seconds_and_parse_address():
    assert seconds(0.5) == "0.5s" and seconds(1.0) == "1s" and seconds(1200.0) == "1200s"
    assert one_line("a\nb   c") == "a b c"
    assert len(one_line("x" * 1000, 50)) == 50
    assert parse_address("10.0.0.1:29400") == ("10.0.0.1", 29400)
    assert parse_address("[::1]:80") == ("[::1]", 80)
    for bad in ("host", ":80", "host:0", "host:65536", "host:x", "a b:1", "[::1:80"):
        assert parse_address(bad) is None, bad


# -------------------------------------------------------------------------- registration
def test_registration_waits_for_every_rank_then_forms_the_world():
    state = CoordinatorState()
    assert isinstance(state.peer_table(), Waiting)
    assert state.register(2, 4, "h:2", "box", 12) is None
    assert state.register(0, 4, "h:10", "box", 10) is None
    waiting = state.peer_table()
    assert isinstance(waiting, Waiting)
    assert "ranks 1, 3 of world size 4" in waiting.reason
    assert isinstance(state.group_status(0), Refusal)
    assert state.register(1, 4, "h:1", "box", 11) is None
    assert state.register(3, 4, "h:3", "box", 13) is None
    table = state.peer_table()
    assert isinstance(table, PeerTable)
    assert [p.address for p in table.peers] == ["h:10", "h:1", "h:2", "h:3"]
    assert table[2].pid == 12 and len(table) == 4
    world = state.group_status(0)
    assert world.members == (0, 1, 2, 3) and world.epoch == table.epoch and world.name == "world"


def test_world_size_mismatch_names_both_values():
    state = CoordinatorState()
    state.register(0, 4, "h:1", "box", 1)
    refusal = state.register(1, 8, "h:2", "box", 2)
    assert refusal.kind == MISMATCH
    assert "8" in refusal.message and "4" in refusal.message and "rank 1" in refusal.message


@pytest.mark.parametrize("args, words", [
    ((4, 4, "h:1", "box", 1), "out of range"),
    ((0, -1, "h:1", "box", 1), "world size -1"),
    ((1 << 20, 0, "h:1", "box", 1), "open job"),
    ((0, 2, "nohost", "box", 1), "host:port"),
])
def test_malformed_registrations_are_refused(args, words):
    refusal = CoordinatorState().register(*args)
    assert refusal.kind == INVALID and words in refusal.message


def test_an_open_job_lists_whoever_joined_and_forms_groups_of_them():
    state = CoordinatorState()
    assert state.register(5, 0, "h:5", "nodeA", 5) is None   # open: any rank, no world size
    table = state.peer_table()
    assert [p.rank for p in table.peers] == [5] and table.epoch == 0
    assert state.register(2, 0, "h:2", "nodeB", 2) is None
    assert [p.rank for p in state.peer_table().peers] == [2, 5]
    assert state.group_status(0).kind == NOT_FOUND                # no world group in an open job
    t5, t2 = state.join_group("g", [5, 2], 5), state.join_group("g", [5, 2], 2)
    info = state.formation_outcome(t2)
    assert info.members == (5, 2) and state.formation_outcome(t5) == info
    refusal = state.register(3, 4, "h:7", "nodeC", 7)
    assert refusal.kind == MISMATCH and "open" in refusal.message


def test_a_fixed_job_refuses_an_open_joiner():
    state = registered(2)
    refusal = state.register(2, 0, "h:9", "box", 9)
    assert refusal.kind == MISMATCH and "world size is 2" in refusal.message


def test_reregistration_is_idempotent_for_the_same_process_and_refused_for_another():
    state = registered(2)
    epoch = state.peer_table().epoch
    assert state.register(1, 2, "127.0.0.1:4001", "box", 101) is None
    assert state.peer_table().epoch == epoch
    refusal = state.register(1, 2, "127.0.0.1:5000", "box", 999)
    assert refusal.kind == EXISTS and "pid 101" in refusal.message


def test_dead_rank_may_be_taken_by_a_new_process_but_not_by_the_old_one():
    state = registered(2)
    state.report_failure(0, 1, 0, "connection reset")
    evicted = state.register(1, 2, "127.0.0.1:4001", "box", 101)
    assert evicted.kind == PEER_FAILURE and evicted.rank == 1 and "connection reset" in evicted.message
    before = state.group_status(0).epoch
    assert state.register(1, 2, "127.0.0.1:5001", "box", 202) is None
    table = state.peer_table()
    assert table[1].address == "127.0.0.1:5001" and table.epoch > before
    assert state.group_status(0).dead == ()


def test_rank_reported_dead_before_registering_fails_the_wait_until_a_process_takes_it():
    state = CoordinatorState()
    state.register(0, 3, "h:1", "box", 1)
    state.report_failure(0, 2, -1, "exited with code 1")
    refusal = state.peer_table()
    assert refusal.kind == PEER_FAILURE and refusal.rank == 2 and "exited with code 1" in refusal.message
    assert state.register(2, 3, "h:3", "box", 3) is None  # a new process takes rank 2
    assert isinstance(state.peer_table(), Waiting)
    state.register(1, 3, "h:2", "box", 2)
    assert state.group_status(0).dead == ()


# ----------------------------------------------------------------------------- groups
def test_group_forms_when_all_members_joined_and_not_before():
    state = registered(4)
    t2 = state.join_group("g", [2, 0, 3], 2)
    assert isinstance(t2, FormationTicket)
    waiting = state.formation_outcome(t2)
    assert isinstance(waiting, Waiting) and "ranks 0, 3" in waiting.reason
    state.join_group("g", [2, 0, 3], 0)
    t3 = state.join_group("g", [2, 0, 3], 3)
    info = state.formation_outcome(t2)
    assert info == state.formation_outcome(t3)
    assert info.members == (2, 0, 3) and info.group_id >= 1 and info.name == "g"
    assert state.group_status(info.group_id) == info


def test_groups_get_unique_ids_and_growing_epochs_also_when_a_name_is_reused():
    state = registered(4)
    a = formed(state, "g", [0, 1])
    b = formed(state, "h", [1, 2, 3])
    c = formed(state, "g", [0, 1])
    assert len({0, a.group_id, b.group_id, c.group_id}) == 4
    assert state.group_status(0).epoch < a.epoch < b.epoch < c.epoch


def test_caller_outside_its_member_list_and_malformed_lists_are_invalid():
    state = registered(4)
    cases = [(("g", [0, 1], 2), "not in its member list"), (("g", [], 0), "no members"),
             (("g", [0, 0, 1], 0), "more than once"), (("g", [0, 9], 0), "outside world size 4"),
             (("", [0], 0), "name")]
    for args, words in cases:
        refusal = state.join_group(*args)
        assert refusal.kind == INVALID and words in refusal.message, (args, refusal)


def test_member_list_mismatch_fails_every_caller_of_the_round_then_a_new_round_works():
    state = registered(4)
    t0 = state.join_group("g", [0, 1, 2], 0)
    refusal = state.join_group("g", [0, 1], 1)
    assert refusal.kind == MISMATCH
    assert "[0, 1, 2]" in refusal.message and "[0, 1]" in refusal.message
    assert state.formation_outcome(t0).kind == MISMATCH
    late = state.join_group("g", [0, 1, 2], 2)  # the third member arrives after the mismatch
    assert late.kind == MISMATCH
    assert formed(state, "g", [0, 1, 2]).members == (0, 1, 2)  # everyone calls again: fine


def test_a_rank_that_was_told_starts_a_new_round():
    state = registered(4)
    state.join_group("g", [0, 1, 2], 0)
    state.join_group("g", [0, 1], 1)
    t1 = state.join_group("g", [0, 1], 1)  # rank 1 heard, calls again: a new round
    assert isinstance(t1, FormationTicket)
    assert isinstance(state.formation_outcome(t1), Waiting)


def test_order_of_members_matters():
    state = registered(2)
    state.join_group("g", [0, 1], 0)
    assert state.join_group("g", [1, 0], 1).kind == MISMATCH


def test_a_caller_that_leaves_must_call_again():
    state = registered(3)
    t0 = state.join_group("g", [0, 1], 0)
    state.leave_group(t0)
    assert "g" not in state.forming
    t1 = state.join_group("g", [0, 1], 1)
    assert isinstance(state.formation_outcome(t1), Waiting)
    state.join_group("g", [0, 1], 0)
    assert isinstance(state.formation_outcome(t1), GroupInfo)
    state.leave_group(t1)  # leaving after completion changes nothing
    assert isinstance(state.formation_outcome(t1), GroupInfo)


def test_same_rank_twice_in_a_round_counts_once_and_needs_two_leaves():
    state = registered(2)
    a = state.join_group("g", [0, 1], 0)
    state.join_group("g", [0, 1], 0)
    state.leave_group(a)
    t1 = state.join_group("g", [0, 1], 1)
    assert isinstance(state.formation_outcome(t1), GroupInfo)


# ---------------------------------------------------------------------------- failures
def test_failure_bumps_every_group_of_the_rank_and_is_idempotent():
    state = registered(4)
    a = formed(state, "a", [0, 1, 2])
    b = formed(state, "b", [2, 3])
    c = formed(state, "c", [0, 1])
    world = state.group_status(0)
    outcome = state.report_failure(a.group_id, 2, 0, "peer closed the connection\nat byte 12")
    assert outcome.newly_dead
    bumped = dict(outcome.bumped)
    assert set(bumped) == {0, a.group_id, b.group_id}
    assert bumped[0] > world.epoch and bumped[b.group_id] > b.epoch
    assert state.group_status(c.group_id).epoch == c.epoch
    status = state.group_status(b.group_id)
    assert status.dead_ranks == (2,)
    assert status.dead[0].reason == "peer closed the connection at byte 12" and status.dead[0].reporter == 0
    again = state.report_failure(0, 2, 3, "another reason")
    assert again == FailureOutcome(False, ())
    assert state.group_status(b.group_id).dead[0].reason == "peer closed the connection at byte 12"


def test_failure_fails_rounds_waiting_for_the_rank_and_later_rounds_that_name_it():
    state = registered(4)
    ticket = state.join_group("g", [0, 1, 3], 0)
    state.report_failure(0, 3, -1, "")
    outcome = state.formation_outcome(ticket)
    assert outcome.kind == PEER_FAILURE and outcome.rank == 3
    assert "reported by the launcher" in outcome.message
    refusal = state.join_group("h", [0, 3], 0)
    assert refusal.kind == PEER_FAILURE and refusal.rank == 3
    assert formed(state, "g", [0, 1]).members == (0, 1)  # the survivors re-form


def test_failure_reports_are_validated():
    state = registered(3)
    g = formed(state, "g", [0, 1])
    assert state.report_failure(0, 5, 0, "").kind == INVALID
    assert state.report_failure(99, 1, 0, "").kind == NOT_FOUND
    assert state.report_failure(g.group_id, 2, 0, "").kind == INVALID
    assert state.group_status(99).kind == NOT_FOUND


def test_rank_reported_dead_before_the_world_formed_shows_in_the_world():
    state = CoordinatorState()
    state.register(0, 2, "h:1", "box", 1)
    assert state.report_failure(0, 0, -1, "exited with status 1").newly_dead
    state.register(1, 2, "h:2", "box", 2)
    assert state.group_status(0).dead_ranks == (0,)


# -------------------------------------------------------------------------------- KV
def test_kv_set_get_delete_add():
    state = CoordinatorState()
    assert isinstance(state.kv_get("k"), Waiting)
    state.kv_set("k", b"\x00value")
    assert state.kv_get("k") == b"\x00value"
    assert state.kv_delete("k") is True and state.kv_delete("k") is False
    assert state.kv_add("n", 5) == 5 and state.kv_add("n", -7) == -2
    assert state.kv_get("n") == b"-2"
    state.kv_set("blob", b"\xff")
    assert state.kv_add("blob", 1).kind == INVALID
    state.kv_set("big", str((1 << 63) - 1).encode())
    assert "overflow" in state.kv_add("big", 1).message
    assert state.kv_set("", b"x").kind == INVALID
