"""Fuzzing every loader of untrusted text (hypothesis): the topology/1 loader, the schedule/1
loader, the emulation plan read back, the size parser (and its three callers) and ``--param``
values of the presets. Each is fed arbitrary text and structured-but-wrong JSON (valid documents
with fields replaced by hostile values, raw tokens such as ``1e99999999999``, 5,000-digit numbers,
NaN and 3,000-deep brackets spliced in, then cut short); every input either loads or raises the
library's own error, one line, quickly.

A short run here (CI, well under 20 s); the long run, at least 10,000 inputs per surface with time
and memory measured, is ``bench/fuzz_inputs.py`` (it imports :data:`SURFACES` from this file), and
``-m slow`` runs it here with a smaller count.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collcomm.cli import build_preset
from collcomm.cli.errors import UsageError as CliUsageError
from collcomm.emulation.plan import EmulationError, FabricPlan, plan
from collcomm.errors import ScheduleError, TopologyError
from collcomm.faults import inject
from collcomm.inputs import SizeError, parse_size
from collcomm.perf import options as perf_options
from collcomm.schedules import generate, ir
from collcomm.topology import jsonio
from collcomm.topology import presets as P
from collcomm.topology.presets import PRESETS, preset_parameters

REPO = Path(__file__).resolve().parent.parent
SLOW_CALL = 5.0  # seconds: a generous bound here (a loaded CI machine); the bench holds each input to 1 s

# ---------------------------------------------------------------------------- hostile pieces
# Raw JSON tokens spliced into documents as they are (json.dumps could not write most of them).
RAW_TOKENS = ["1e99999999999", "-1e99999999999", "1e-99999999999", "1e400", "-1e400", "9" * 5000, "1" + "0" * 400,
              "NaN", "Infinity", "-Infinity", "-0", "5e-324", "1.7976931348623157e308", "0.1", "12345678901234567890",
              "[" * 3000 + "]" * 3000, '{"a":' * 100 + "1" + "}" * 100, '"' + "x" * 20000 + '"', "[]", "{}"]
STRINGS = ["1e99999999999", "1e-99999999999", "25/2", "1/0", "-1", "0", "NaN", "inf", "", "a\nb", "\x1b[31m", "x" * 300,
           "0x10", "1_000", "\u0661\u0662", "9" * 5000, "compute", "switch", "a", "b", "r0", "r1", "s", "ccemu",
           "ccemu-0", "10.250.0.1", "e1", "lo", "allreduce", "allgather", "reduce_scatter", "1/13",
           "collcomm.topology/1", "collcomm.schedule/1"]
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(STRINGS))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.one_of(st.text(max_size=6), st.sampled_from(["id", "src", "dst", "bandwidth", "kind", "share", "root"])),
    inner, max_size=4), max_leaves=12)
_MARK = "\u0000raw{}\u0000"


def _places(d) -> list[tuple]:
    """Every (container, key) in ``d``, breadth first."""
    out, stack = [], [d]
    while stack:
        c = stack.pop()
        keys = list(c) if isinstance(c, dict) else range(len(c))
        for k in keys:
            out.append((c, k))
            if isinstance(c[k], (dict, list)):
                stack.append(c[k])
    return out


@st.composite
def damaged(draw, bases: list) -> str:
    """A valid document from ``bases`` with a few fields replaced, deleted, wrapped or made raw
    hostile tokens, serialized, and sometimes cut short or nested deep."""
    d = copy.deepcopy(draw(st.sampled_from(bases)))
    raw: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        places = _places(d)
        if not places or draw(st.integers(0, 30)) == 0:
            d = draw(values)
            break
        container, key = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "replace", "raw", "raw", "delete", "wrap"]))
        if action == "replace":
            container[key] = draw(values)
        elif action == "raw":
            raw.append(draw(st.sampled_from(RAW_TOKENS)))
            container[key] = _MARK.format(len(raw) - 1)
        elif action == "delete":
            del container[key]
        else:
            container[key] = [container[key]]
    text = json.dumps(d, allow_nan=True)
    for i, token in enumerate(raw):
        text = text.replace(json.dumps(_MARK.format(i)), token)
    how = draw(st.sampled_from(["whole"] * 6 + ["cut", "deep", "garbage"]))
    if how == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "deep":
        k = draw(st.integers(1, 3000))
        text = "[" * k + text + "]" * k
    elif how == "garbage":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=8)) + text[at:]
    return text


def any_text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
                     st.integers(0, 5000).map(lambda k: "[" * k + "]" * k), st.sampled_from(RAW_TOKENS))


# ---------------------------------------------------------------------------- valid documents to damage
_SMALL = [P.ring(4), P.ring(3, bidirectional=False), P.star(3), P.leaf_spine(2, 2, 2), P.two_clusters(2),
          P.hypercube(2), P.torus2d(2, 3)]
TOPOLOGY_DOCS = [jsonio.to_dict(t) for t in _SMALL]
SCHEDULE_DOCS = [ir.to_dict(generate(t, coll, algo)) for t, coll, algo in (
    (P.ring(4), "allreduce", "ring"), (P.star(3), "allgather", "forestcoll"), (P.ring(3), "reduce_scatter", "tree"))]
PLAN_DOCS = [json.loads(plan(t).to_json()) for t in (P.ring(3), P.leaf_spine(2, 2, 2))]


# ---------------------------------------------------------------------------- the surfaces
def load_topology(text: str):
    return jsonio.loads(text)


def load_schedule(text: str):
    return ir.loads(text)


def load_plan(text: str):
    return FabricPlan.from_json(text)


SIZE_UNITS = ["", "K", "k", "KB", "KiB", "kib", "M", "G", "g", "T", "P", "E", "iB", "B", "X", " K", "KK", "M B"]
size_texts = st.one_of(
    st.tuples(st.one_of(st.integers(0, 10**40).map(str), st.decimals(allow_nan=True, allow_infinity=True).map(str),
                        st.floats(allow_nan=True).map(repr), st.sampled_from(["1e99999999999", "1e-99999999999",
                                                                               ".5", "5.", ".", "-1", "+1", "1e3"])),
              st.sampled_from(SIZE_UNITS), st.sampled_from(["", " ", "  "])).map(lambda t: t[2] + t[0] + t[1] + t[2]),
    st.text(max_size=30), st.sampled_from(RAW_TOKENS))


def load_size(text: str):
    """The size parser and its callers agree: collcomm-perf (UsageError) and COLLCOMM_FAULTS
    (ValueError) accept what it accepts, with the same bytes, and refuse the rest."""
    try:
        size = parse_size(text)
    except SizeError:
        size = None
    try:
        perf = perf_options.parse_size(text, "-b")
    except perf_options.UsageError as e:
        assert size is None and str(e).startswith("-b "), (text, size, e)
    else:
        assert perf == size, (text, size, perf)
    if not set(text) & set(";:\r\n"):
        try:
            after = inject.parse(f"reset:0->1:after={text}").rules[0].after
        except ValueError as e:
            assert size is None and str(e).startswith("COLLCOMM_FAULTS: "), (text, size, e)
        else:
            assert after == size, (text, size, after)
    if size is None:
        raise SizeError("refused")
    return size


NUMBER_TEXTS = st.one_of(st.integers(-5, 40).map(str), st.integers(10**4, 10**40).map(str),
                         st.fractions(max_denominator=100).map(str), st.floats(allow_nan=True).map(repr),
                         st.decimals(allow_nan=True).map(str),
                         st.sampled_from(["1e99999999999", "1e-99999999999", "9" * 5000, "1/0", "true", "no", "0x1",
                                          "1e400", "25/2", "3/2", "", " "]),
                         st.text(max_size=12))


@st.composite
def param_inputs(draw):
    name = draw(st.sampled_from(sorted(PRESETS)))
    keys = preset_parameters(name)
    params = [f"{draw(st.sampled_from(keys + ['colour']))}={draw(NUMBER_TEXTS)}"
              for _ in range(draw(st.integers(0, 2)))]
    sizes = st.one_of(st.none(), st.integers(1, 40), st.integers(10**4, 10**40))
    return name, draw(sizes), draw(sizes), params


# The presets run under these limits: whatever a generated input builds then takes well under a
# second, so a slow input can only be a bug (the defaults' largest topologies take seconds to build,
# measured apart by the bench).
PARAM_LIMITS = {"COLLCOMM_MAX_NODES": "256", "COLLCOMM_MAX_LINKS": "2048"}


def load_params(given_input):
    name, boxes, ranks, params = given_input
    sized = [(flag, v) for flag, v in (("boxes", boxes), ("ranks", ranks)) if v is not None]
    try:
        return build_preset(name, boxes, ranks, params)
    except CliUsageError:
        raise
    except TopologyError as e:
        if sized and not str(e):
            raise AssertionError(f"an empty message for {given_input}") from None
        raise


# name: (strategy, loader, the errors a refusal may be, environment to run under)
SURFACES = {
    "topology/1 loader": (st.one_of(damaged(TOPOLOGY_DOCS), any_text()), load_topology, (TopologyError,), {}),
    "schedule/1 loader": (st.one_of(damaged(SCHEDULE_DOCS), any_text()), load_schedule, (ScheduleError,), {}),
    "emulation plan loader": (st.one_of(damaged(PLAN_DOCS), any_text()), load_plan, (EmulationError,), {}),
    "sizes (inputs, perf -b, COLLCOMM_FAULTS after=)": (size_texts, load_size, (SizeError,), {}),
    "preset --param/--ranks/--boxes": (param_inputs(), load_params, (TopologyError, CliUsageError), PARAM_LIMITS),
}


@contextmanager
def environment(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_one(loader, errors, given_input) -> None:
    """``loader(given_input)`` loads or raises one of ``errors`` in one line, within SLOW_CALL."""
    t0 = time.perf_counter()
    try:
        loader(given_input)
    except errors as e:
        assert "\n" not in str(e) and len(str(e)) < 1200, str(e)
    elapsed = time.perf_counter() - t0
    assert elapsed < SLOW_CALL, f"{elapsed:.2f} s for {given_input!r:.200}"


FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("surface", sorted(SURFACES))
def test_every_input_loads_or_raises_the_librarys_own_error(surface):
    strategy, loader, errors, env = SURFACES[surface]

    @FUZZ
    @given(strategy)
    def run(given_input):
        check_one(loader, errors, given_input)

    with environment(env):
        run()


@pytest.mark.timeout(60)
def test_the_valid_documents_load_and_round_trip():
    """The fuzz starts from documents that load: a refusal is the damage's, not the base's."""
    for d in TOPOLOGY_DOCS:
        assert jsonio.to_dict(jsonio.loads(json.dumps(d))) == d
    for d in SCHEDULE_DOCS:
        assert ir.to_dict(ir.loads(json.dumps(d))) == d
    for d in PLAN_DOCS:
        assert json.loads(FabricPlan.from_json(json.dumps(d)).to_json()) == d


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_long_fuzz_run_finds_no_failure():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", REPO / "bench" / "fuzz_inputs.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    rows = bench.run_all(count=2000)
    assert all(row.failures == 0 for row in rows), bench.table(rows)
    assert all(row.tried >= 2000 for row in rows), bench.table(rows)
