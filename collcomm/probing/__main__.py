"""``python -m collcomm.probing --out FILE`` (under ``collcomm run``): probe the job's fabric and
have rank 0 write it (``collcomm topology --probe -np N`` runs it)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from collcomm.probing.network import probe_runtime
from collcomm.topology import jsonio


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m collcomm.probing --out FILE``: run as every rank of a job."""
    p = argparse.ArgumentParser(prog="python -m collcomm.probing",
                                description="Probe the job's fabric; rank 0 writes collcomm.topology/1 JSON.")
    p.add_argument("--out", required=True, help="topology file (written by rank 0)")
    p.add_argument("--measurements", help="also write what was measured (JSON)")
    p.add_argument("--seconds", type=float, default=None, help="measuring window per transfer (s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    import collcomm as cc

    os.environ.pop("COLLCOMM_TOPOLOGY", None)  # this job measures the fabric; no planner input wanted
    cc.init()
    try:
        rt = cc.api.runtime()
        log = None if args.quiet or rt.rank != 0 else (lambda msg: print(f"probe: {msg}", file=sys.stderr))
        topo, m = probe_runtime(rt, seconds_per_pair=args.seconds, log=log)
        if rt.rank == 0:
            tmp = args.out + ".tmp"
            jsonio.save(topo, tmp)
            os.replace(tmp, args.out)
            if args.measurements:
                with open(args.measurements, "w") as f:
                    json.dump(m.to_json(), f, indent=1)
    finally:
        cc.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
