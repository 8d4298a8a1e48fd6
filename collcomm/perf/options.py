"""The command line of ``collcomm-perf``: flags, their checks, and the list of sizes.

Everything that can be wrong with the input is found here, before any process starts, and
raised as :class:`UsageError` (one line on stderr, exit status 2). The same parser runs in
the launching process and in every rank, so the ranks see exactly the options it checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from collcomm.inputs import SizeError, shown
from collcomm.inputs import parse_size as inputs_parse_size

PROG = "collcomm-perf"
EXIT_OK, EXIT_WRONG, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "broadcast", "reduce", "alltoall")
REDUCING = ("allreduce", "reduce_scatter", "reduce")
ROOTED = ("broadcast", "reduce")
_COLLECTIVE_ALIASES = {"all_reduce": "allreduce", "all_gather": "allgather", "reducescatter": "reduce_scatter",
                       "all_to_all": "alltoall", "bcast": "broadcast"}
OPS = ("sum", "prod", "max", "min", "avg")
# nccl-tests' type names (what the table prints) -> NumPy's (bfloat16: a torch type)
DTYPES = {"int8": "int8", "uint8": "uint8", "int32": "int32", "uint32": "uint32", "int64": "int64",
          "uint64": "uint64", "half": "float16", "float": "float32", "double": "float64", "bfloat16": "bfloat16"}
_DTYPE_ALIASES = {"char": "int8", "int": "int32", "uint": "uint32", "float16": "half", "fp16": "half",
                  "float32": "float", "fp32": "float", "float64": "double", "fp64": "double", "bf16": "bfloat16"}
FLOAT_TYPES = ("half", "float", "double", "bfloat16")
ALGORITHMS = {"forestcoll": "forestcoll", "ring": "ring", "tree": "tree", "halving_doubling": "halving-doubling",
              "halving-doubling": "halving-doubling"}
COMPARE = ("gloo", "mpi", "mpi-tcp")  # mpi: MPI's default transport; mpi-tcp: Open MPI's TCP (--mca btl tcp,self)
GLOO_TYPES = ("int8", "uint8", "int32", "int64", "half", "float", "double", "bfloat16")  # torch has no gloo uint32/64
MPI_TYPES = ("int8", "uint8", "int32", "uint32", "int64", "uint64", "float", "double")  # MPI has no half/bfloat16
AVERAGES = {0: "rank 0", 1: "average", 2: "min", 3: "max"}
MAX_SIZES = 10000
DEFAULT_BYTES = 32 << 20
# Upper bounds of the counts (-n, -w, -c, -N, -f), of -np (ranks started on this machine) and of -T
# (collcomm's API refuses longer timeouts too: Python's waits cannot honour them). A bound keeps a
# typo (an extra digit or three) from a run that never ends or a fork storm.
MAX_COUNT = 1_000_000
MAX_NPROCS = 1024
MAX_RANK = (1 << 31) - 1
MAX_TIMEOUT = 1e9
_INTEGER = re.compile(r"\s*[-+]?\d{1,30}\s*", re.ASCII)


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's hook: no usage text, no SystemExit
        raise UsageError(message)


@dataclass
class Options:
    collective: str
    dtypes: list[str]          # nccl-tests names ("float", ...)
    ops: list[str]             # reductions, or ["none"] for collectives that do not reduce
    minbytes: int
    maxbytes: int
    stepfactor: int
    stepbytes: int
    iters: int
    warmup: int
    check: int
    root: int
    average: int
    repeat: int
    nprocs: int | None
    algorithm: str | None
    topology: str | None
    emulate: str | None
    scale: str | None          # --scale and --prefix of --emulate, as given (None: the defaults)
    prefix: str | None
    json: str | None
    plot: str | None
    compare: list[str]
    timeout: float | None
    argv: list[str] = field(default_factory=list)
    device: str = "cpu"        # --device: where the buffers live (cuda: refused until the GPU executor exists)

    def combos(self) -> list[tuple[str, str]]:
        """(type, redop) of every sweep, in nccl-tests' order (types outside, reductions inside); with
        ``-d all``/``-o all``: the types every compared library has, and avg only on floating-point types."""
        out = []
        for d in self.dtypes:
            if ("gloo" in self.compare and d not in GLOO_TYPES) or (uses_mpi(self.compare) and d not in MPI_TYPES):
                continue
            out += [(d, o) for o in self.ops if o != "avg" or d in FLOAT_TYPES]
        return out

    @property
    def sizes(self) -> list[int]:
        return sweep_sizes(self.minbytes, self.maxbytes, self.stepfactor, self.stepbytes)

    def as_dict(self) -> dict:
        """The configuration as the JSON output records it."""
        return {"collective": self.collective, "dtype": self.dtypes if len(self.dtypes) > 1 else self.dtypes[0],
                "op": self.ops if len(self.ops) > 1 else self.ops[0], "minbytes": self.minbytes,
                "maxbytes": self.maxbytes, "stepfactor": self.stepfactor, "stepbytes": self.stepbytes,
                "iters": self.iters, "warmup_iters": self.warmup, "check_iters": self.check, "root": self.root,
                "average": self.average, "average_name": AVERAGES[self.average], "repeat": self.repeat,
                "nprocs": self.nprocs, "algorithm": self.algorithm, "topology": self.topology,
                "emulate": self.emulate, **self._emulation(), "compare": self.compare, "timeout": self.timeout,
                "argv": list(self.argv)}

    def _emulation(self) -> dict:
        """The scale and prefix the emulated fabric runs at (null without --emulate)."""
        if not self.emulate:
            return {"scale": None, "prefix": None}
        from collcomm.emulation import DEFAULT_PREFIX, DEFAULT_SCALE

        return {"scale": self.scale or DEFAULT_SCALE, "prefix": self.prefix or DEFAULT_PREFIX}


# ---------------------------------------------------------------------------- values
def parse_size(text: str, flag: str) -> int:
    """Bytes from ``123``, ``1K``, ``1.5M``, ``2G``, ``4KiB`` (powers of 1024; case ignored; at
    most ``COLLCOMM_MAX_SIZE_BYTES``, 1P): :func:`collcomm.inputs.sizes.parse_size`."""
    try:
        return inputs_parse_size(str(text))
    except SizeError as e:
        raise UsageError(f"{flag} {e}") from None


def sweep_sizes(lo: int, hi: int, factor: int, step: int) -> list[int]:
    """nccl-tests' sweep: lo, then times ``factor`` (when > 1) or plus ``step``, while <= hi."""
    out, size = [], lo
    while size <= hi:
        out.append(size)
        size = size * factor if factor > 1 else size + step
        if len(out) > MAX_SIZES:
            break
    return out


def collective_name(text: str) -> str:
    name = text.strip().lower().replace("-", "_")
    name = name[:-5] if name.endswith("_perf") else name
    name = _COLLECTIVE_ALIASES.get(name, name)
    if name not in COLLECTIVES:
        raise UsageError(f"unknown collective {shown(text)}; choose one of: {', '.join(COLLECTIVES)}")
    return name


def _int(flag: str, low: int | None, high: int):
    """An argparse type: an integer of at most 30 digits in [low, high] (``low`` None: checked
    later by parse(), which words the message for the flag)."""
    def convert(text: str) -> int:
        if not _INTEGER.fullmatch(text):
            raise argparse.ArgumentTypeError(f"expected an integer, got {shown(text)}")
        value = int(text)
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return convert


def _seconds(text: str) -> float:
    try:
        value = float(text) if len(text) <= 100 else math.nan
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {shown(text)}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds (at most {MAX_TIMEOUT:g}), "
                                         f"got {shown(text)}")
    return value


def uses_mpi(compare: list[str]) -> bool:
    """Whether the ranks must be MPI processes (started by mpiexec)."""
    return any(lib.startswith("mpi") for lib in compare)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from collcomm.emulation.options import add_emulation_arguments

    p = _Parser(prog=PROG, allow_abbrev=False,
                description="nccl-tests-style bandwidth sweep of one collective over collcomm (all_reduce_perf "
                            "and friends): out-of-place and in-place time, algbw, busbw and #wrong per size.",
                epilog="Example: collcomm-perf allreduce -b 1K -e 64M -f 2 -np 4 --compare gloo")
    p.add_argument("collective", nargs="?", metavar="COLLECTIVE",
                   help=f"the operation: {', '.join(COLLECTIVES)} (default allreduce)")
    p.add_argument("-C", "--collective", dest="collective_flag", metavar="COLLECTIVE",
                   help="the operation, as a flag (same as the positional argument)")
    p.add_argument("-b", "--minbytes", default=None, metavar="SIZE", help="smallest size in bytes (default 32M)")
    p.add_argument("-e", "--maxbytes", default=None, metavar="SIZE", help="largest size in bytes (default 32M)")
    p.add_argument("-f", "--stepfactor", type=_int("-f", 1, MAX_COUNT), default=1, metavar="F",
                   help="multiply the size by F each step (1: add -i instead)")
    p.add_argument("-i", "--stepbytes", default="1M", metavar="SIZE", help="size increment when -f is 1 (default 1M)")
    p.add_argument("-n", "--iters", type=_int("-n", 1, MAX_COUNT), default=20, metavar="N",
                   help="timed iterations (default 20)")
    p.add_argument("-w", "--warmup_iters", type=_int("-w", 0, MAX_COUNT), default=1, metavar="N",
                   help="warm-up iterations at the largest and smallest size (default 1)")
    p.add_argument("-c", "--check", type=_int("-c", 0, MAX_COUNT), default=1, metavar="N",
                   help="correctness-check iterations per size and variant (0: #wrong prints N/A; default 1)")
    p.add_argument("-o", "--op", default=None, metavar="OP",
                   help=f"reduction: {', '.join(OPS)} or all (default sum; collectives that do not reduce: none)")
    p.add_argument("-d", "--datatype", default="float", metavar="TYPE",
                   help=f"{' '.join(DTYPES)} or all (default float)")
    p.add_argument("-r", "--root", type=_int("-r", 0, MAX_RANK), default=0, metavar="RANK",
                   help="root of broadcast and reduce (default 0)")
    p.add_argument("-a", "--average", type=_int("-a", None, MAX_COUNT), default=1, metavar="A",
                   help="combine the ranks' times: 0 rank 0, 1 average, 2 min, 3 max (default 1)")
    p.add_argument("-N", "--run_cycles", type=_int("-N", None, MAX_COUNT), default=1, metavar="N",
                   help="repeat the whole sweep N times (default 1; 0, forever, is refused)")
    p.add_argument("-np", "--nprocs", type=_int("-np", None, MAX_NPROCS), default=None, metavar="N",
                   help="ranks to launch on this machine (default 1; leave out under `collcomm run`)")
    p.add_argument("-T", "--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="timeout of every collective call (default collcomm's, COLLCOMM_TIMEOUT or 300)")
    p.add_argument("--algorithm", metavar="NAME",
                   help="run every collective with this algorithm: forestcoll, ring, tree, halving_doubling "
                        "(default: the planner's choice per size; alltoall is always a pairwise exchange)")
    p.add_argument("--topology", metavar="T.json", help="the job's fabric (collcomm.topology/1), for the planner, or "
                                                         "'probe': the ranks measure it at start")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the buffers live (default cpu); cuda needs a GPU, its driver and NCCL (the gpu extra)")
    add_emulation_arguments(p, "--emulate", "run the ranks in network namespaces wired as T.json says (built for "
                                            "the run unless `collcomm emulate up` built it; needs root)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (see the module documentation)")
    p.add_argument("--plot", metavar="IMAGE", help="plot busbw against size (.png, .svg or .pdf)")
    p.add_argument("--compare", metavar="LIBS",
                   help="also run the sweep through these libraries, comma-separated; adds their columns and busbw "
                        "ratios: gloo (torch.distributed), mpi (mpi4py over MPI's default transport: Open MPI's "
                        "shared memory on one machine), mpi-tcp (mpi4py over Open MPI's TCP transport, mpiexec "
                        "--mca pml ob1 --mca btl tcp,self); mpi and mpi-tcp need separate runs. With mpi or mpi-tcp "
                        "mpiexec starts the ranks (needs mpi4py and an MPI's mpiexec on PATH)")
    return p


def parse(argv: list[str]) -> Options:
    """Parse and check the command line; raises UsageError naming what is wrong."""
    args = build_parser().parse_args(argv)
    if args.collective and args.collective_flag and collective_name(args.collective) != collective_name(
            args.collective_flag):
        raise UsageError(f"two collectives given: {shown(args.collective)} and -C {shown(args.collective_flag)}")
    coll = collective_name(args.collective or args.collective_flag or "allreduce")

    lo = parse_size(args.minbytes, "-b") if args.minbytes is not None else None
    hi = parse_size(args.maxbytes, "-e") if args.maxbytes is not None else None
    if lo is None:  # nccl-tests' defaults are 32M and 32M; one bound alone stretches the other
        lo = DEFAULT_BYTES if hi is None else min(hi, DEFAULT_BYTES)
    if hi is None:
        hi = max(lo, DEFAULT_BYTES)
    step = parse_size(args.stepbytes, "-i")
    if lo > hi:
        raise UsageError(f"-b {args.minbytes} ({lo} bytes) is greater than -e {args.maxbytes} ({hi} bytes)")
    if args.stepfactor > 1 and lo == 0:
        raise UsageError("-b 0 with -f > 1 never grows; give a positive -b")
    if args.stepfactor == 1 and step == 0 and lo < hi:
        raise UsageError("-i 0 with -f 1 never grows; give a positive -i or a factor -f > 1")
    count = len(sweep_sizes(lo, hi, args.stepfactor, step))
    if count > MAX_SIZES:
        raise UsageError(f"the sweep from {lo} to {hi} bytes has more than {MAX_SIZES} sizes; raise -i or -f")

    dtypes = _dtypes(args.datatype)
    ops = _ops(args.op, coll, dtypes)
    if args.average not in AVERAGES:
        raise UsageError(f"-a {args.average}: choose 0 (rank 0), 1 (average), 2 (min) or 3 (max)")
    if args.run_cycles < 1:
        why = "0 would repeat forever; every run here is bounded" if args.run_cycles == 0 else "a count"
        raise UsageError(f"-N {args.run_cycles}: give a positive number of sweeps ({why})")
    if args.nprocs is not None and args.nprocs < 1:
        raise UsageError(f"-np {args.nprocs}: give at least 1 rank")
    algorithm = None
    if args.algorithm is not None:
        algorithm = ALGORITHMS.get(args.algorithm.strip().lower())
        if algorithm is None:
            raise UsageError(f"--algorithm {shown(args.algorithm)}: choose one of forestcoll, ring, tree, "
                             f"halving_doubling")
    probe = args.topology is not None and args.topology.strip().lower() == "probe"  # the ranks measure it
    for flag, path in (("--topology", None if probe else args.topology), ("--emulate", args.emulate)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    compare = _compare(args.compare, dtypes)
    if args.json:
        check_output(args.json, "--json")
    if args.plot:
        check_output(args.plot, "--plot", image=True)
    if uses_mpi(compare) and args.emulate:
        mpi = next(lib for lib in compare if lib.startswith("mpi"))
        raise UsageError(f"--compare {mpi} starts the ranks with mpiexec, which cannot run them in --emulate "
                         f"namespaces")
    _check_emulation(args)
    if args.device == "cuda":
        _check_cuda()
    return Options(coll, dtypes, ops, lo, hi, args.stepfactor, step, args.iters, args.warmup_iters, args.check,
                   args.root, args.average, args.run_cycles, args.nprocs, algorithm,
                   "probe" if probe else str(Path(args.topology).resolve()) if args.topology else None,
                   str(Path(args.emulate).resolve()) if args.emulate else None, args.scale, args.prefix, args.json,
                   args.plot, compare, args.timeout, list(argv), args.device)


def _check_cuda() -> None:
    """--device cuda: one line naming what is missing (NCCL, the CUDA driver, a GPU)."""
    from collcomm.transport.nccl import gpu_problem

    problem = gpu_problem()
    if problem is not None:
        raise UsageError(f"--device cuda: {problem}")
    raise UsageError("--device cuda: collcomm-perf has no GPU sweep yet (NCCL and a GPU were found)")


def _check_emulation(args) -> None:
    """--scale and --prefix: checked as `collcomm run --emulate` checks them."""
    from collcomm.emulation import EmulationError
    from collcomm.emulation.options import check_emulation_arguments

    try:
        check_emulation_arguments(args.emulate, args.scale, args.prefix)
    except EmulationError as e:
        raise UsageError(str(e)) from None


def _dtypes(text: str) -> list[str]:
    name = text.strip().lower()
    if name == "all":
        return [d for d in DTYPES if d != "bfloat16" or has_module("torch")]
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise UsageError(f"-d {shown(text)}: unknown type; choose one of: {', '.join(DTYPES)}, all")
    if name == "bfloat16" and not has_module("torch"):
        raise UsageError("-d bfloat16 needs torch (NumPy has no bfloat16); install torch or choose another type")
    return [name]


def _ops(text: str | None, coll: str, dtypes: list[str]) -> list[str]:
    if coll not in REDUCING:
        if text is None or text.strip().lower() in ("sum", "none", "all"):
            return ["none"]
        raise UsageError(f"-o {text}: {coll} does not reduce (its redop is none); leave out -o")
    name = (text or "sum").strip().lower()
    if name == "all":
        return list(OPS)
    if name not in OPS:
        raise UsageError(f"-o {shown(text)}: unknown reduction; choose one of: {', '.join(OPS)}, all")
    if name == "avg":
        ints = [d for d in dtypes if d not in FLOAT_TYPES]
        if ints and len(dtypes) == 1:
            raise UsageError(f"-o avg needs a floating-point type (half, float, double, bfloat16), not {ints[0]}")
    return [name]


def _compare(text: str | None, dtypes: list[str]) -> list[str]:
    if not text:
        return []
    libs = []
    for part in text.split(","):
        name = part.strip().lower().replace("_", "-")
        if name not in COMPARE:
            raise UsageError(f"--compare {shown(text)}: unknown library {shown(part.strip())}; choose from "
                             f"{', '.join(COMPARE)} "
                             f"(comma-separated)")
        if name not in libs:
            libs.append(name)
    if "gloo" in libs:
        if not has_module("torch"):
            raise UsageError("--compare gloo needs torch (torch.distributed's gloo backend); it is not installed")
        bad = [d for d in dtypes if d not in GLOO_TYPES]
        if bad and len(dtypes) == 1:
            raise UsageError(f"--compare gloo: gloo has no {bad[0]} type; choose one of {', '.join(GLOO_TYPES)}")
    mpis = [lib for lib in libs if lib.startswith("mpi")]
    if len(mpis) > 1:
        raise UsageError(f"--compare {','.join(mpis)}: one mpiexec job has one MPI transport; run them separately")
    if mpis:
        mpi = mpis[0]
        if not has_module("mpi4py"):
            raise UsageError(f"--compare {mpi}: mpi4py is not installed (pip install mpi4py, with an MPI library: "
                             f"apt-get install openmpi-bin libopenmpi-dev)")
        if not (shutil.which("mpiexec") or shutil.which("mpirun")):
            raise UsageError(f"--compare {mpi}: no mpiexec or mpirun on PATH to start the ranks with")
        bad = [d for d in dtypes if d not in MPI_TYPES]
        if bad and len(dtypes) == 1:
            raise UsageError(f"--compare {mpi}: MPI has no {bad[0]} type; choose one of {', '.join(MPI_TYPES)}")
        if mpi == "mpi-tcp":
            from collcomm.perf.mpi import mpiexec_flavour

            flavour = mpiexec_flavour()
            if flavour != "openmpi":
                raise UsageError(f"--compare mpi-tcp: chooses Open MPI's TCP transport (--mca btl tcp,self), but "
                                 f"mpiexec is {flavour}; use --compare mpi")
    return libs


def check_world(opts: Options, world: int) -> None:
    """The checks that need the number of ranks."""
    if opts.collective in ROOTED and not 0 <= opts.root < world:
        raise UsageError(f"-r {opts.root}: not a rank of {world} (give 0..{world - 1})")


def check_output(path: str, flag: str, image: bool = False) -> None:
    """Fail before any work when an output cannot be written where asked."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {str(parent)!r} is not writable")
    if image and p.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"{flag} {path}: unknown image format {p.suffix or '(none)'!r}; use .png, .svg or .pdf")
