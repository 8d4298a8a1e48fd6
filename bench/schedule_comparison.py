"""Model bandwidth of every algorithm on the presets, as a fraction of the exact optimum.

    python bench/schedule_comparison.py

Prints a Markdown table (algbw in GB/s from the exact evaluator, ratio to the cut
bound) for allgather and allreduce, and writes bench/results/schedule_comparison.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from collcomm.errors import ScheduleError
from collcomm.schedules import ALGORITHMS, generate
from collcomm.schedules.optimum import collective_bound
from collcomm.topology import presets as P

FABRICS = [
    P.dgx_a100(2), P.dgx_a100(4), P.dgx_h100(2), P.mi250(2), P.two_clusters(), P.leaf_spine(4, 4, 2, 1, 2),
    P.torus2d(4, 4), P.ring(8), P.star(8),
]


def main() -> None:
    rows = []
    for collective in ("allgather", "allreduce"):
        print(f"\n### {collective}\n")
        print("| fabric | optimum GB/s | " + " | ".join(ALGORITHMS) + " |")
        print("|---|---:|" + "---:|" * len(ALGORITHMS))
        for topo in FABRICS:
            bound = collective_bound(topo, collective)
            cells = []
            for name in ALGORITHMS:
                start = time.perf_counter()
                try:
                    s = generate(topo, collective, name)
                except ScheduleError:
                    cells.append("no plan")
                    rows.append({"fabric": topo.name, "collective": collective, "algorithm": name, "algbw": None})
                    continue
                ratio = s.algbw / bound
                cells.append(f"{float(s.algbw):.1f} ({float(ratio):.3f})")
                rows.append({"fabric": topo.name, "collective": collective, "algorithm": name,
                             "algbw": str(s.algbw), "ratio": str(ratio),
                             "seconds": round(time.perf_counter() - start, 4)})
            print(f"| {topo.name} | {float(bound):.1f} | " + " | ".join(cells) + " |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "schedule_comparison.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "command": "python bench/schedule_comparison.py", "rows": rows},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
