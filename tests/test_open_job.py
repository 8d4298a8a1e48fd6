"""Open jobs (world size 0), without Ray: processes join whenever they start, draw their ranks
from the coordinator's counter, and form groups of whoever has joined; a process that joined
later is reached by point-to-point messages and objects too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from collcomm.coordinator.server import CoordinatorServer

TOKEN = "open-job-test-token-0123456789abcdef"

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import collcomm as cc

    address, role = sys.argv[1], sys.argv[2]
    cc.init(world_size=0, coordinator=address, token=%r, timeout=30, hostname="box-" + role)
    rt = cc.api.runtime()
    me = cc.rank()
    client = rt.client
    client.kv_set(f"rank/{role}", str(me).encode())
    out = {"role": role, "rank": me, "world_size": cc.world_size()}
    try:
        cc.allreduce(np.ones(3))
    except cc.CollectiveError as e:
        out["world_call"] = type(e).__name__
    if role in ("a", "b"):   # the first two: a group of two, before c exists
        ranks = [int(client.kv_get(f"rank/{r}", timeout=30)) for r in ("a", "b")]
        g = cc.new_group(ranks, name="ab")
        x = np.full(1000, me + 1.0)
        cc.allreduce(x, group=g)
        out["ab"] = float(x[0])
        client.kv_set(f"ab-done/{role}", b"1")
    else:                    # c joins after a and b formed their group
        for r in ("a", "b"):
            client.kv_get(f"ab-done/{r}", timeout=30)
    ranks = [int(client.kv_get(f"rank/{r}", timeout=30)) for r in ("c", "a", "b")]
    g = cc.new_group(ranks, name="cab")     # c first: group rank order is the list's order
    out["cab_rank"] = g.rank
    x = np.arange(6, dtype=np.int64) * (me + 1)
    cc.allreduce(x, group=g)
    out["cab"] = x.tolist()
    if role == "a":          # a sends to c, who joined last, by its job rank
        cc.send(np.arange(5.0), ranks[0])
        cc.put("from-a", np.arange(100_000, dtype=np.int32))
    if role == "c":
        y = np.zeros(5)
        cc.recv(y, ranks[1])
        out["p2p"] = y.tolist()
        out["object_sum"] = int(cc.get("from-a", timeout=30).sum())
    cc.barrier(group=g)
    out["hosts"] = sorted(set(rt.hostnames[r] for r in g.members))
    print("RESULT " + json.dumps(out), flush=True)
    cc.shutdown()
""") % TOKEN


@pytest.mark.timeout(120)
def test_processes_join_an_open_job_at_different_times_and_form_groups_of_whoever_joined(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("COLLCOMM_COORDINATOR", None)
    with CoordinatorServer(TOKEN, host="127.0.0.1", port=0) as server:
        address = server.address
        procs = {}
        for role in ("a", "b", "c"):    # c starts last, after a and b may already have run a collective
            procs[role] = subprocess.Popen([sys.executable, str(script), address, role], stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, env=env)
        outs = {}
        try:
            for role, p in procs.items():
                text, _ = p.communicate(timeout=90)
                assert p.returncode == 0, f"{role}: {text[-3000:]}"
                outs[role] = json.loads([l for l in text.splitlines() if l.startswith("RESULT ")][-1][7:])
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
    ranks = {r: o["rank"] for r, o in outs.items()}
    assert sorted(ranks.values()) == [0, 1, 2]                  # drawn from the counter, one each
    assert all(o["world_size"] == 0 and o["world_call"] == "CollectiveError" for o in outs.values())
    assert outs["a"]["ab"] == outs["b"]["ab"] == ranks["a"] + ranks["b"] + 2.0
    want = [i * sum(r + 1 for r in ranks.values()) for i in range(6)]
    assert all(o["cab"] == want for o in outs.values())
    assert [outs[r]["cab_rank"] for r in ("c", "a", "b")] == [0, 1, 2]
    assert outs["c"]["p2p"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert outs["c"]["object_sum"] == sum(range(100_000))
    assert outs["a"]["hosts"] == ["box-a", "box-b", "box-c"]  # each registered the host it was given
