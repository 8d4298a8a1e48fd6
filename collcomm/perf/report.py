"""What the user sees: the nccl-tests table, its footer, the JSON file, the plot, the progress bar.

The :class:`Reporter` consumes the events rank 0 emits (``start``, one ``row`` per size, ``end``)
— in the launching process, which reads them from the report file, or in rank 0 itself when
the ranks were started by another launcher — and prints each row as it arrives.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from collcomm.perf.options import AVERAGES, Options, UsageError

FORMAT = "collcomm.perf/1"
BASE = (("size", "(B)", 12), ("count", "(elements)", 14), ("type", "", 10), ("redop", "", 8), ("root", "", 8))
SIDE = (("time", "(us)", 9), ("algbw", "(GB/s)", 8), ("busbw", "(GB/s)", 8), ("#wrong", "", 8))
RATIO_WIDTH = 9
VARIANTS = (("out_of_place", "out-of-place"), ("in_place", "in-place"))


def time_text(us: float) -> str:
    """The time column: seven characters, two decimals while they fit (as in nccl-tests' sample
    rows), then fewer."""
    if us >= 99999.95:
        return f"{us:7.0f}"
    if us >= 9999.995:
        return f"{us:7.1f}"
    return f"{us:7.2f}"


def side_text(side: dict) -> str:
    wrong = "N/A" if side["nwrong"] is None else str(side["nwrong"])
    return f"{time_text(side['time']):>9}{side['alg_bw']:8.2f}{side['bus_bw']:8.2f}{wrong:>8}"


def _groups(compare: list[str]) -> list[tuple[str, int]]:
    """(title, width) of the column groups after the base columns."""
    side = sum(w for _, _, w in SIDE)
    groups = [(title, side) for _, title in VARIANTS]
    for lib in compare:
        groups += [(f"{lib} {title}", side) for _, title in VARIANTS]
    for lib in compare:
        groups.append((f"collcomm/{lib} busbw", 2 * RATIO_WIDTH))
    return groups


def header_lines(compare: list[str]) -> list[str]:
    base = sum(w for _, _, w in BASE)
    groups = _groups(compare)
    line1 = [" "] * (base + sum(w for _, w in groups))
    line1[0] = "#"
    at = base
    for title, width in groups:
        start = at + max((width - len(title) + 1) // 2, 0)
        line1[start:start + len(title)] = title
        at += width
    names, units = [], []
    for i, (name, unit, width) in enumerate(BASE):
        w = width - 1 if i == 0 else width
        names.append(f"{name:>{w}}")
        units.append(f"{unit:>{w}}")
    for _ in range(2 + 2 * len(compare)):
        for name, unit, width in SIDE:
            names.append(f"{name:>{width}}")
            units.append(f"{unit:>{width}}")
    for _ in compare:
        names += [f"{'oop':>{RATIO_WIDTH}}", f"{'ip':>{RATIO_WIDTH}}"]
        units += [f"{'(x)':>{RATIO_WIDTH}}", f"{'(x)':>{RATIO_WIDTH}}"]
    return ["".join(line1).rstrip(), ("#" + "".join(names)).rstrip(), ("#" + "".join(units)).rstrip()]


def row_text(row: dict, compare: list[str]) -> str:
    text = (f"{row['size']:12d}{row['count']:14d}{row['type']:>10}{row['redop']:>8}{row['root']:8d}"
            + side_text(row["out_of_place"]) + side_text(row["in_place"]))
    for lib in compare:
        entry = row["compare"][lib]
        text += side_text(entry["out_of_place"]) + side_text(entry["in_place"])
    for lib in compare:
        for v, _ in VARIANTS:
            r = row["compare"][lib]["bus_bw_ratio"][v]
            text += f"{'N/A':>{RATIO_WIDTH}}" if r is None else f"{r:{RATIO_WIDTH}.2f}"
    return text


def avg_bus_bw(rows: list[dict], lib: str | None = None) -> float:
    values = [(r if lib is None else r["compare"][lib])[v]["bus_bw"] for r in rows for v, _ in VARIANTS]
    return sum(values) / len(values) if values else 0.0


def out_of_bounds(rows: list[dict]) -> int:
    total = 0
    for r in rows:
        for entry in [r] + list(r.get("compare", {}).values()):
            total += sum(entry[v]["nwrong"] or 0 for v, _ in VARIANTS)
    return total


class Progress:
    """A one-line bar on a terminal's stderr, shown once a sweep has run for a second."""

    def __init__(self, total: int, stream, enabled: bool):
        self.total, self.stream = total, stream
        self.enabled = enabled and total > 1 and hasattr(stream, "isatty") and stream.isatty()
        self.started = time.monotonic()
        self.done = 0
        self.shown = False

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled or done >= self.total or time.monotonic() - self.started < 1.0:
            return
        width = 30
        filled = width * done // self.total
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r\x1b[K[{'=' * filled}{' ' * (width - filled)}] {done}/{self.total} rows  "
                          f"{elapsed:.0f} s")
        self.stream.flush()
        self.shown = True


class Reporter:
    def __init__(self, opts: Options, out=None, err=None):
        self.opts = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.start: dict | None = None
        self.rows: list[dict] = []
        self.ended = False
        self.progress = Progress(0, self.err, False)

    def _print(self, line: str = "") -> None:
        self.progress.clear()
        self.out.write(line + "\n")
        self.out.flush()

    def handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            self.start = event
            self.progress = Progress(event.get("rows_total", 0), self.err, enabled=not self.opts.json)
            for line in self.prelude(event) + header_lines(self.opts.compare):
                self._print(line)
        elif kind == "row":
            self.rows.append(event["row"])
            self._print(row_text(event["row"], self.opts.compare))
            self.progress.update(len(self.rows))
        elif kind == "end":
            self.ended = True

    def prelude(self, start: dict) -> list[str]:
        o = self.opts
        step = f"{o.stepfactor}(factor)" if o.stepfactor > 1 else f"{o.stepbytes}(bytes)"
        lines = [f"# Collective test starting: collcomm-perf {o.collective}",
                 f"# nRanks {start['world_size']} minBytes {o.minbytes} maxBytes {o.maxbytes} step: {step} "
                 f"warmup iters: {o.warmup} iters: {o.iters} validation: {o.check} cycles: {o.repeat} "
                 f"average: {o.average} ({AVERAGES[o.average]})",
                 f"# algorithm: {start['algorithm']}  fabric: {start['fabric']}"
                 + (f"  compare: {', '.join(o.compare)}" if o.compare else ""),
                 "#", "# Using ranks"]
        for r in start["ranks"]:
            lines.append(f"#  Rank {r['rank']:2d} Pid {r['pid']:6d} on {r['host']:>10}")
        lines.append("#")
        return lines

    def finish(self) -> int:
        """Footer, JSON and plot; the exit status (1 when any element was wrong)."""
        self.progress.clear()
        wrong = out_of_bounds(self.rows)
        self._print(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
        self._print(f"# Avg bus bandwidth    : {avg_bus_bw(self.rows):g}")
        for lib in self.opts.compare:
            self._print(f"# Avg bus bandwidth    : {avg_bus_bw(self.rows, lib):g} ({lib})")
        self._print("#")
        if self.opts.json:
            write_json(self.opts.json, self.document())
        if self.opts.plot:
            plot(self.opts.plot, self.rows, self.opts.compare, self.opts.collective, self.start or {})
        return 1 if wrong else 0

    def abort(self) -> None:
        self.progress.clear()

    def document(self) -> dict:
        s = self.start or {}
        config = dict(self.opts.as_dict())
        config.update({k: s.get(k) for k in ("world_size", "fabric", "libraries", "machine", "date")})
        doc = {"format": FORMAT, "config": config, "ranks": s.get("ranks", []), "rows": self.rows,
               "avg_bus_bw": avg_bus_bw(self.rows), "out_of_bounds": out_of_bounds(self.rows)}
        if self.opts.compare:
            doc["compare_avg_bus_bw"] = {lib: avg_bus_bw(self.rows, lib) for lib in self.opts.compare}
        return doc


def write_json(path: str, doc: dict) -> None:
    try:
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def plot(path: str, rows: list[dict], compare: list[str], collective: str, start: dict) -> None:
    """busbw against size, one curve per library and variant (and type/reduction when several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = {(r["type"], r["redop"]) for r in rows}
    series: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for r in rows:
        tag = f" {r['type']} {r['redop']}" if len(combos) > 1 else ""
        for lib, entry in [("collcomm", r)] + [(lib, r["compare"][lib]) for lib in compare]:
            for v, title in VARIANTS:
                points = series.setdefault((lib + tag, title, v), {})
                points.setdefault(r["size"], []).append(entry[v]["bus_bw"])
    colors = {}
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, title, v), points in series.items():
        xs = sorted(s for s in points if s > 0)
        color = colors.setdefault(name, f"C{len(colors) % 10}")  # one colour per library (and type/op)
        ax.plot(xs, [sum(points[s]) / len(points[s]) for s in xs], marker="o", markersize=3, color=color,
                linestyle="-" if v == "out_of_place" else "--", label=f"{name} {title}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    n = start.get("world_size", "?")
    ax.set_title(f"collcomm-perf {collective}, {n} ranks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
