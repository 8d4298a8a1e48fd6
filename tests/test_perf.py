"""`collcomm-perf`, run as a user runs it (``python -m collcomm.perf``, a subprocess that launches
its ranks): the nccl-tests table, its numbers and footer, the JSON file, the checker (including a
run where it must find wrong elements), bad input, and the comparison with gloo.

Every multi-process run uses a few small sizes and few iterations; the table is parsed and
checked against itself (algbw = size / time, busbw = algbw x the collective's factor, the
average footer = the mean of the rows) and against the JSON file, which carries the exact
numbers the table rounds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collcomm.perf import collectives as C
from collcomm.perf.options import UsageError, parse, parse_size, sweep_sizes
from collcomm.perf.report import Progress, header_lines, row_text, time_text

REPO = Path(__file__).resolve().parent.parent
FACTOR = {"allreduce": lambda n: 2 * (n - 1) / n, "allgather": lambda n: (n - 1) / n,
          "reduce_scatter": lambda n: (n - 1) / n, "alltoall": lambda n: (n - 1) / n,
          "broadcast": lambda n: 1.0, "reduce": lambda n: 1.0}
ITEMSIZE = {"int8": 1, "uint8": 1, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "half": 2, "float": 4,
            "double": 8, "bfloat16": 2}
JOB_TIMEOUT = 120


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLLCOMM_", "TORCHELASTIC_")) and k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLLCOMM_TIMEOUT": "60"}, **extra)
    return env


def perf(*args, env: dict | None = None, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m collcomm.perf ARGS`` to the end (the subprocess bounds every wait)."""
    return subprocess.run([sys.executable, "-m", "collcomm.perf", *map(str, args)], capture_output=True, text=True,
                          env=clean_env(**(env or {})), timeout=timeout, cwd=REPO)


class Table:
    """The parsed output: header lines, rows (token lists) and footer values."""

    def __init__(self, stdout: str):
        self.lines = stdout.splitlines()
        self.rows = [l.split() for l in self.lines if l.strip() and not l.startswith("#")]
        avg = [l for l in self.lines if l.startswith("# Avg bus bandwidth    : ")]
        self.avg = float(avg[0].split(":")[1].split()[0]) if avg else None
        self.avg_lines = avg
        oob = [re.match(r"^# Out of bounds values : (\d+) (OK|FAILED)$", l) for l in self.lines]
        oob = [m for m in oob if m]
        self.out_of_bounds = (int(oob[0].group(1)), oob[0].group(2)) if oob else None


def groups(tokens: list[str]) -> list[list[str]]:
    """The 4-column groups (time, algbw, busbw, #wrong) after the 5 base columns."""
    rest = tokens[5:]
    return [rest[i:i + 4] for i in range(0, len(rest) - len(rest) % 4, 4)]


def check_side(size: int, factor: float, group: list[str], side: dict) -> None:
    """One variant's printed columns against each other and against the JSON's exact numbers."""
    t, alg, bus = float(group[0]), float(group[1]), float(group[2])
    assert group[0] == time_text(side["time"]).strip()
    assert group[1] == f"{side['alg_bw']:.2f}" and group[2] == f"{side['bus_bw']:.2f}"
    # the JSON's numbers are exact: algbw = size / time (GB = 1e9), busbw = algbw x factor
    assert side["alg_bw"] == pytest.approx(size / (side["time"] * 1e-6) / 1e9, rel=1e-9)
    assert side["bus_bw"] == pytest.approx(side["alg_bw"] * factor, rel=1e-9, abs=1e-15)
    # and the printed ones agree within their rounding, the time's included (MPI's fastest take 1-2 us,
    # where the time's last digit alone is 0.5%)
    recomputed = size / (t * 1e3)
    timing = 0.0051 / t
    assert alg == pytest.approx(recomputed, abs=0.0051 + recomputed * timing, rel=2e-3)
    assert bus == pytest.approx(recomputed * factor, abs=0.0051 + recomputed * factor * timing, rel=2e-3)


def expected_layout(coll: str, nbytes: int, dtype: str, n: int) -> tuple[int, int]:
    """(printed size, printed count) by nccl-tests' rules, written out independently."""
    w = ITEMSIZE[dtype]
    count = nbytes // w
    per = count // n
    if coll in ("allgather", "reduce_scatter", "alltoall"):
        return per * n * w, per
    return count * w, count


def check_run(proc, coll: str, n: int, dtype: str, op: str, sizes: list[int], root: int, json_path: Path,
              check: bool = True, compare: tuple[str, ...] = ()) -> tuple[Table, dict]:
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stderr == "", proc.stderr  # no progress bar (not a terminal), no rank output
    assert "[rank" not in proc.stdout
    table = Table(proc.stdout)
    doc = json.loads(json_path.read_text())
    # header: nccl-tests' three lines, then one row per size
    head = [l for l in table.lines if l.startswith("#") and ("out-of-place" in l or "#wrong" in l or "(B)" in l)]
    assert head == header_lines(list(compare))
    assert "#       size         count      type   redop    root     time   algbw   busbw  #wrong" in head[1]
    assert len(table.rows) == len(sizes) == len(doc["rows"])
    factor = FACTOR[coll](n)
    for tokens, nbytes, row in zip(table.rows, sizes, doc["rows"]):
        assert len(tokens) == 5 + 8 * (1 + len(compare)) + 2 * len(compare), tokens
        size, count = expected_layout(coll, nbytes, dtype, n)
        assert (int(tokens[0]), int(tokens[1]), tokens[2], tokens[3], int(tokens[4])) == (
            size, count, dtype, op, root if coll in ("broadcast", "reduce") else -1)
        assert (row["size"], row["count"], row["type"], row["redop"], row["root"]) == (
            int(tokens[0]), int(tokens[1]), tokens[2], tokens[3], int(tokens[4]))
        sides = [row["out_of_place"], row["in_place"]]
        for lib in compare:
            sides += [row["compare"][lib]["out_of_place"], row["compare"][lib]["in_place"]]
        for group, side in zip(groups(tokens), sides):
            check_side(size, factor, group, side)
            if check:
                assert group[3] == "0" and side["nwrong"] == 0, (tokens, side)
            else:
                assert group[3] == "N/A" and side["nwrong"] is None
        assert line_of(row, compare) in table.lines
    # footer: no wrong element, the mean busbw of every row in- and out-of-place
    assert table.out_of_bounds == (0, "OK")
    mean = sum(r[v]["bus_bw"] for r in doc["rows"] for v in ("out_of_place", "in_place")) / (2 * len(sizes))
    assert doc["avg_bus_bw"] == pytest.approx(mean, rel=1e-12)
    assert table.avg == pytest.approx(mean, rel=1e-5, abs=1e-9)  # printed with %g
    printed = [float(g[2]) for t in table.rows for g in groups(t)[:2]]
    assert table.avg == pytest.approx(sum(printed) / len(printed), abs=0.0051)
    # the documented JSON fields
    assert doc["format"] == "collcomm.perf/1" and doc["out_of_bounds"] == 0
    cfg = doc["config"]
    for key in ("collective", "dtype", "op", "minbytes", "maxbytes", "stepfactor", "stepbytes", "iters",
                "warmup_iters", "check_iters", "root", "average", "repeat", "nprocs", "algorithm", "topology",
                "emulate", "compare", "timeout", "argv", "world_size", "fabric", "libraries", "machine", "date"):
        assert key in cfg, key
    assert (cfg["collective"], cfg["dtype"], cfg["op"], cfg["world_size"], cfg["nprocs"]) == (coll, dtype, op, n, n)
    assert {"hostname", "platform", "cpus", "python", "numpy"} <= set(cfg["machine"])
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", cfg["date"])
    assert [r["rank"] for r in doc["ranks"]] == list(range(n))
    return table, doc


def line_of(row: dict, compare) -> str:
    return row_text(row, list(compare))


# ---------------------------------------------------------------------------- every collective
CASES = [  # collective, ranks, type, reduction, root
    ("allreduce", 4, "float", "sum", 0),
    ("allreduce", 3, "int32", "prod", 0),
    ("allreduce", 2, "half", "avg", 0),
    ("allgather", 3, "int8", "none", 0),
    ("reduce_scatter", 4, "double", "max", 0),
    ("reduce_scatter", 3, "uint8", "min", 0),
    ("broadcast", 3, "int64", "none", 2),
    ("reduce", 4, "float", "min", 3),
    ("reduce", 2, "bfloat16", "sum", 1),
    ("alltoall", 4, "uint32", "none", 0),
    ("alltoall", 3, "float", "none", 0),
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("coll,n,dtype,op,root", CASES, ids=[f"{c}-np{n}-{d}-{o}" for c, n, d, o, _ in CASES])
def test_every_collective_prints_a_correct_nccl_tests_table(tmp_path, coll, n, dtype, op, root):
    out = tmp_path / "perf.json"
    args = [coll, "-b", "1000", "-e", "64K", "-f", "8", "-n", "3", "-np", n, "-d", dtype, "-r", root, "-c", "2",
            "--json", out]
    if op != "none":
        args += ["-o", op]
    proc = perf(*args)
    check_run(proc, coll, n, dtype, op, [1000, 8000, 64000], root, out)


@pytest.mark.timeout(150)
def test_no_check_prints_na_repeats_and_combines_by_max(tmp_path):
    out = tmp_path / "perf.json"
    proc = perf("allgather", "-b", "4K", "-e", "8K", "-f", "2", "-n", "2", "-np", 2, "-c", 0, "-N", 2, "-a", 3,
                "--json", out)
    table, doc = check_run(proc, "allgather", 2, "float", "none", [4096, 8192] * 2, 0, out, check=False)
    assert doc["config"]["repeat"] == 2 and doc["config"]["average"] == 3


@pytest.mark.timeout(150)
def test_additive_steps_and_an_algorithm(tmp_path):
    out = tmp_path / "perf.json"
    proc = perf("allreduce", "-b", "2K", "-e", "6K", "-i", "2K", "-n", "2", "-np", 3, "--algorithm", "ring",
                "--json", out)
    _, doc = check_run(proc, "allreduce", 3, "float", "sum", [2048, 4096, 6144], 0, out)
    assert doc["config"]["algorithm"] == "ring"
    assert "step: 2048(bytes)" in proc.stdout


# ---------------------------------------------------------------------------- the checker finds faults
@pytest.mark.timeout(150)
@pytest.mark.parametrize("coll", ["allreduce", "alltoall", "reduce"])
def test_a_corrupted_element_shows_in_wrong_and_fails_the_run(tmp_path, coll):
    """COLLCOMM_PERF_CORRUPT=RANK:INDEX flips one element of RANK's collcomm result before the check:
    every row counts it once per check iteration and variant, the footer says FAILED, exit status 1."""
    out = tmp_path / "perf.json"
    rank = 2 if coll == "reduce" else 1  # a reduce's result is checked at its root only
    proc = perf(coll, "-b", "4K", "-e", "16K", "-f", "4", "-n", "2", "-np", 3, "-c", 3, "-r", 2, "--json", out,
                env={"COLLCOMM_PERF_CORRUPT": f"{rank}:7"})
    assert proc.returncode == 1, proc.stderr + proc.stdout
    table = Table(proc.stdout)
    assert len(table.rows) == 2
    for tokens in table.rows:
        assert [g[3] for g in groups(tokens)] == ["3", "3"], tokens
    assert table.out_of_bounds == (12, "FAILED")
    doc = json.loads(out.read_text())
    assert [r["out_of_place"]["nwrong"] for r in doc["rows"]] == [3, 3] and doc["out_of_bounds"] == 12


# ---------------------------------------------------------------------------- compared with gloo
@pytest.mark.timeout(200)
def test_compare_gloo_adds_its_columns_and_the_ratio(tmp_path):
    pytest.importorskip("torch")
    out, png = tmp_path / "perf.json", tmp_path / "busbw.png"
    proc = perf("reduce_scatter", "-b", "1K", "-e", "16K", "-f", "4", "-n", "2", "-np", 2, "-o", "sum",
                "--compare", "gloo", "--json", out, "--plot", png)
    table, doc = check_run(proc, "reduce_scatter", 2, "float", "sum", [1024, 4096, 16384], 0, out,
                           compare=("gloo",))
    head = header_lines(["gloo"])
    assert "gloo out-of-place" in head[0] and "collcomm/gloo busbw" in head[0]
    for tokens, row in zip(table.rows, doc["rows"]):
        entry = row["compare"]["gloo"]
        for k, v in enumerate(("out_of_place", "in_place")):
            ratio = entry["bus_bw_ratio"][v]
            assert ratio == pytest.approx(row[v]["bus_bw"] / entry[v]["bus_bw"], rel=1e-12)
            assert tokens[-2 + k] == f"{ratio:.2f}"
    gloo_avg = [l for l in table.lines if l.startswith("# Avg bus bandwidth") and l.endswith("(gloo)")]
    assert len(gloo_avg) == 1 and float(gloo_avg[0].split(":")[1].split()[0]) == pytest.approx(
        doc["compare_avg_bus_bw"]["gloo"], rel=1e-5)
    assert doc["config"]["libraries"] == ["collcomm", "gloo"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(200)
def test_compare_gloo_alltoall_in_place_is_checked(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "perf.json"
    proc = perf("alltoall", "-b", "3K", "-e", "3K", "-n", "2", "-np", 3, "-d", "int32", "--compare", "gloo",
                "--json", out)
    check_run(proc, "alltoall", 3, "int32", "none", [3072], 0, out, compare=("gloo",))


@pytest.mark.parametrize("lib", ["mpi", "mpi-tcp"])
def test_compare_mpi_without_mpi4py_is_one_line_and_exit_2(lib):
    from collcomm.perf.options import has_module

    if has_module("mpi4py"):
        pytest.skip("mpi4py is installed here")
    proc = perf("--compare", lib, "-np", 2)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "mpi4py is not installed" in proc.stderr


# ---------------------------------------------------------------------------- compared with MPI
def mpi_missing(lib: str) -> str | None:
    """Why ``--compare LIB`` (mpi, mpi-tcp) cannot run here, or None. CI's fresh venv has no mpi4py."""
    from collcomm.perf.options import has_module

    if not has_module("mpi4py"):
        return "mpi4py is not installed (the mpi extra: pip install mpi4py, with a system MPI)"
    if not (shutil.which("mpiexec") or shutil.which("mpirun")):
        return "no mpiexec or mpirun on PATH (apt-get install openmpi-bin libopenmpi-dev)"
    if lib == "mpi-tcp":
        from collcomm.perf.mpi import mpiexec_flavour

        flavour = mpiexec_flavour()
        if flavour != "openmpi":
            return f"--compare mpi-tcp needs Open MPI's mpiexec; this one is {flavour}"
    return None


@pytest.mark.timeout(200)
@pytest.mark.parametrize("lib,coll", [("mpi", "allreduce"), ("mpi-tcp", "allreduce"), ("mpi", "reduce_scatter")])
def test_compare_mpi_starts_the_ranks_with_mpiexec_and_checks_its_results(tmp_path, lib, coll):
    """Under mpiexec (as root too, and with more ranks than cores where that is the case) the
    ranks are collcomm's and MPI's at once; every MPI result is checked (#wrong 0)."""
    why = mpi_missing(lib)
    if why:
        pytest.skip(why)
    out = tmp_path / "perf.json"
    proc = perf(coll, "-b", "1K", "-e", "16K", "-f", "4", "-n", "2", "-np", 2, "--compare", lib, "--json", out)
    table, doc = check_run(proc, coll, 2, "float", "sum", [1024, 4096, 16384], 0, out, compare=(lib,))
    assert doc["config"]["libraries"] == ["collcomm", lib] and doc["config"]["compare"] == [lib]
    assert f"{lib} out-of-place" in header_lines([lib])[0] and table.rows


@pytest.mark.timeout(200)
def test_compare_gloo_and_mpi_in_the_same_ranks(tmp_path):
    pytest.importorskip("torch")
    why = mpi_missing("mpi")
    if why:
        pytest.skip(why)
    out = tmp_path / "perf.json"
    proc = perf("-b", "4K", "-e", "64K", "-f", "16", "-n", "2", "-np", 2, "--compare", "gloo,mpi", "--json", out)
    check_run(proc, "allreduce", 2, "float", "sum", [4096, 65536], 0, out, compare=("gloo", "mpi"))


@pytest.mark.timeout(200)
def test_a_corrupted_mpi_result_shows_in_its_wrong_column(tmp_path):
    """COLLCOMM_PERF_CORRUPT=RANK:INDEX:mpi flips one element of MPI's results: its columns count
    it, collcomm's stay 0, and the run fails."""
    why = mpi_missing("mpi")
    if why:
        pytest.skip(why)
    out = tmp_path / "perf.json"
    proc = perf("-b", "4K", "-e", "4K", "-n", "2", "-np", 2, "-c", 2, "--compare", "mpi", "--json", out,
                env={"COLLCOMM_PERF_CORRUPT": "1:7:mpi"})
    assert proc.returncode == 1, proc.stderr + proc.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert [row[v]["nwrong"] for v in ("out_of_place", "in_place")] == [0, 0]
    assert [row["compare"]["mpi"][v]["nwrong"] for v in ("out_of_place", "in_place")] == [2, 2]
    assert Table(proc.stdout).out_of_bounds == (4, "FAILED")


# ---------------------------------------------------------------------------- bad input
BAD = {
    "min above max": (["-b", "2M", "-e", "1M"], "greater than"),
    "bad suffix": (["-b", "12X"], "not a size"),
    "bad max": (["-e", "1.5.3M"], "not a size"),
    "unknown dtype": (["-d", "float8"], "unknown type"),
    "unknown op": (["-o", "mean"], "unknown reduction"),
    "unknown collective": (["allscatter"], "unknown collective"),
    "root out of range": (["broadcast", "-r", "4", "-np", "4"], "-r 4"),
    "no ranks": (["-np", "0"], "-np 0"),
    "forever": (["-N", "0"], "forever"),
    "prod on alltoall": (["alltoall", "-o", "prod"], "does not reduce"),
    "max on allgather": (["allgather", "-o", "max"], "does not reduce"),
    "avg on integers": (["-o", "avg", "-d", "int32"], "floating-point"),
    "bad average": (["-a", "4"], "-a 4"),
    "zero iterations": (["-n", "0"], "-n"),
    "unknown flag": (["-t", "2"], "unrecognized"),
    "unknown algorithm": (["--algorithm", "magic"], "--algorithm"),
    "missing topology": (["--topology", "/nonexistent/t.json"], "no such file"),
    "unknown library": (["--compare", "nccl"], "unknown library"),
    "two MPI transports": (["--compare", "mpi,mpi-tcp"], "one mpiexec job has one MPI transport"),
    "gloo without uint64": (["--compare", "gloo", "-d", "uint64"], "gloo has no uint64"),
    "json in a missing directory": (["--json", "/nonexistent/dir/x.json"], "does not exist"),
    "plot format": (["--plot", "x.txt"], "image format"),
    "zero step": (["-b", "1K", "-e", "2K", "-i", "0"], "-i 0"),
    "no growth from zero": (["-b", "0", "-e", "1K", "-f", "2"], "-b 0"),
    "two collectives": (["allreduce", "-C", "broadcast"], "two collectives"),
    "too many sizes": (["-b", "1", "-e", "1G", "-i", "1"], "sizes"),
    "too much memory": (["-b", "1G", "-e", "64G", "-f", "2", "-np", "8"], "memory"),
    # --scale and --prefix as `collcomm run --emulate` checks them, before any process starts
    "bad emulation scale": (["--emulate", "bench/topologies/two_box.json", "--scale", "100Mbit"],
                            "--scale must look like 1GB/s=100Mbit, got '100Mbit'"),
    "zero emulation scale": (["--emulate", "bench/topologies/two_box.json", "--scale", "0GB/s=1Mbit"],
                             "--scale: both sides must be positive"),
    "bad emulation prefix": (["--emulate", "bench/topologies/two_box.json", "--prefix", "Bad-1"],
                             "emulation prefix must be 2-9 lowercase letters"),
    "scale without emulate": (["--scale", "1GB/s=10Mbit"], "--scale applies to --emulate only"),
    "prefix without emulate": (["--prefix", "ccx"], "--prefix applies to --emulate only"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_on_stderr_and_exit_2(case):
    args, words = BAD[case]
    proc = perf(*args, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("collcomm-perf: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr


@pytest.mark.parametrize("flavour,euid,cpus,lib,want_args,want_env", [
    ("openmpi", 0, 2, "mpi", [], {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}),
    ("openmpi", 1000, 2, "mpi", [], {}),
    ("openmpi", 1000, 1, "mpi", ["--oversubscribe"], {}),
    ("openmpi", 1000, 2, "mpi-tcp", ["--mca", "pml", "ob1", "--mca", "btl", "tcp,self"], {}),
    ("mpich", 0, 1, "mpi", [], {}),
])
def test_mpiexec_command_for_the_mpi_and_the_user(monkeypatch, flavour, euid, cpus, lib, want_args, want_env):
    """Root and oversubscription are Open MPI's to allow (and only when they are the case); mpi-tcp
    is its TCP BTL under ob1. No MPI needed: the flavour is given."""
    from collcomm.perf import mpi

    monkeypatch.setattr(mpi, "mpiexec", lambda: "mpiexec")
    monkeypatch.setattr(mpi, "mpiexec_flavour", lambda: flavour)
    monkeypatch.setattr(mpi.os, "geteuid", lambda: euid)
    monkeypatch.setattr(mpi.os, "cpu_count", lambda: cpus)
    argv, env = mpi.mpiexec_command(lib, 2)
    assert argv == ["mpiexec", "-n", "2", *want_args] and env == want_env


def test_corruption_names_the_library(monkeypatch):
    from collcomm.perf.sweep import CORRUPT_ENV, corruption

    for raw, me, want in (("1", 1, (0, "collcomm")), ("1:7", 1, (7, "collcomm")), ("1:7:MPI-tcp", 1, (7, "mpi-tcp")),
                          ("1:7:gloo", 0, None), ("", 0, None)):
        monkeypatch.setenv(CORRUPT_ENV, raw)
        assert corruption(me) == want, raw
    monkeypatch.setenv(CORRUPT_ENV, "x:1")
    with pytest.raises(UsageError, match="RANK:INDEX:LIBRARY"):
        corruption(0)


def test_emulation_scale_and_prefix_parse_as_collcomm_run_takes_them():
    two_box = str(REPO / "bench" / "topologies" / "two_box.json")
    opts = parse(["--emulate", two_box, "--scale", "2GB/s=1gbit", "--prefix", "ccperf"])
    assert (opts.emulate, opts.scale, opts.prefix) == (two_box, "2GB/s=1gbit", "ccperf")
    assert (opts.as_dict()["scale"], opts.as_dict()["prefix"]) == ("2GB/s=1gbit", "ccperf")
    defaults = parse(["--emulate", two_box]).as_dict()  # the JSON records what the fabric ran at
    assert (defaults["scale"], defaults["prefix"]) == ("1GB/s=100Mbit", "ccemu")
    assert (parse([]).as_dict()["scale"], parse([]).as_dict()["prefix"]) == (None, None)


def test_topology_of_another_size_is_refused(tmp_path):
    subprocess.run([sys.executable, "-m", "collcomm.cli", "topology", "--preset", "ring", "--ranks", "4", "-o",
                    str(tmp_path / "ring4.json")], check=True, capture_output=True, env=clean_env())
    proc = perf("-np", 3, "--topology", tmp_path / "ring4.json", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "has 4 ranks but -np is 3" in proc.stderr


def test_bfloat16_without_torch_is_refused():
    code = ("import sys; sys.modules['torch'] = None; from collcomm.perf import main; "
            "sys.exit(main(['-d', 'bfloat16']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "bfloat16 needs torch" in proc.stderr and "Traceback" not in proc.stderr


def test_help_exits_0():
    proc = perf("--help", timeout=60)
    assert proc.returncode == 0 and "-np" in proc.stdout and "--compare" in proc.stdout


# ---------------------------------------------------------------------------- pieces, in process
def test_sizes_follow_nccl_tests():
    assert parse_size("1K", "-b") == 1024 and parse_size("1.5M", "-b") == 3 << 19
    assert parse_size("2g", "-e") == 2 << 30 and parse_size("64", "-b") == 64 and parse_size("4KB", "-b") == 4096
    assert sweep_sizes(1024, 16 << 20, 4, 0) == [1 << k for k in range(10, 25, 2)]
    assert sweep_sizes(1 << 20, 3 << 20, 1, 1 << 20) == [1 << 20, 2 << 20, 3 << 20]
    opts = parse(["-b", "1K"])
    assert (opts.minbytes, opts.maxbytes) == (1024, 32 << 20)
    assert parse([]).sizes == [32 << 20]
    with pytest.raises(UsageError):
        parse(["-b", "-1K"])


def test_layouts_and_factors():
    assert C.layout("allgather", 1024, "float", 3) == C.Layout(1020, 85, 85, 255)
    assert C.layout("reduce_scatter", 1024, "float", 3) == C.Layout(1020, 85, 255, 85)
    assert C.layout("alltoall", 1024, "double", 4) == C.Layout(1024, 32, 128, 128)
    assert C.layout("broadcast", 1023, "int32", 4) == C.Layout(1020, 255, 255, 255)
    assert [C.busbw_factor(c, 4) for c in ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast",
                                           "reduce")] == [1.5, 0.75, 0.75, 0.75, 1.0, 1.0]


def test_check_data_catches_a_misplaced_block_and_stays_exact():
    import numpy as np

    for dtype in ("int8", "half", "float", "bfloat16"):
        for n in (2, 5, 40):
            lay = C.layout("allreduce", 4096, dtype, n)
            want = C.expected("allreduce", dtype, "sum", 0, n, 0, lay)
            parts = [C.pattern(dtype, "sum", r, lay.count, 0, n) for r in range(n)]
            assert np.array_equal(C.reduce_parts(dtype, "sum", parts[::-1], n), want)  # order does not matter
    lay = C.layout("alltoall", 4096, "int32", 4)
    want = C.expected("alltoall", "int32", "none", 1, 4, 0, lay)
    swapped = want.copy()
    swapped[:lay.count], swapped[lay.count:2 * lay.count] = want[lay.count:2 * lay.count], want[:lay.count]
    assert C.count_wrong(swapped, want) > 0.9 * 2 * lay.count
    assert C.count_wrong(C.flipped(want), want) == want.size


def test_header_matches_the_nccl_tests_sample():
    notes = Path("/work/shared/notes/nccl-tests.md")
    sample = ["#" + " " * 62 + "out-of-place" + " " * 23 + "in-place",
              "#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw"
              "   busbw  #wrong",
              "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)"
              "  (GB/s)"]
    if notes.exists():
        assert sample[0] in notes.read_text()
    assert header_lines([]) == sample
    row = {"size": 2097152, "count": 524288, "type": "float", "redop": "sum", "root": -1,
           "out_of_place": {"time": 122.30, "alg_bw": 17.15, "bus_bw": 30.02, "nwrong": 0},
           "in_place": {"time": 88.53, "alg_bw": 23.69, "bus_bw": 41.46, "nwrong": 0}}
    assert row_text(row, []) == ("     2097152        524288     float     sum      -1   122.30   17.15   30.02"
                                 "       0    88.53   23.69   41.46       0")


class _Tty:
    def __init__(self, tty: bool):
        self.text, self.tty = "", tty

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_bar_only_on_a_terminal_for_long_sweeps():
    tty = _Tty(True)
    bar = Progress(10, tty, enabled=True)
    bar.update(1)
    assert tty.text == ""  # not yet a second
    bar.started -= 5
    bar.update(3)
    assert "3/10 rows" in tty.text
    bar.clear()
    assert tty.text.endswith("\r\x1b[K")
    pipe = _Tty(False)
    bar = Progress(10, pipe, enabled=True)
    bar.started -= 5
    bar.update(3)
    assert pipe.text == ""
    off = _Tty(True)
    bar = Progress(10, off, enabled=False)  # --json given
    bar.started -= 5
    bar.update(3)
    assert off.text == ""


@pytest.mark.timeout(120)
def test_under_collcomm_run_rank_0_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "collcomm.cli", "run", "-n", "2", sys.executable, "-m",
                           "collcomm.perf", "broadcast", "-b", "1K", "-e", "1K", "-n", "2", "-r", "1"],
                          capture_output=True, text=True, env=clean_env(), timeout=JOB_TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(l.startswith("[rank 0] ") for l in lines)  # rank 1 prints nothing
    rows = [l[len("[rank 0] "):].split() for l in lines if not l.startswith("[rank 0] #")]
    assert len(rows) == 1 and rows[0][:5] == ["1024", "256", "float", "none", "1"] and rows[0][8] == "0"
