"""Bounded parsing (collcomm.inputs) and its loaders: every file and string collcomm reads costs
bounded time and memory, and a bad one is one line in the library's own error type naming the
file, the field and the limit.

The regressions of issue 20 are here: a bandwidth of "1e99999999999" in a file and via --param,
JSON nested 2,000 deep, a 5,000-digit number, a latency of 1e400 written out in digits and
``--ranks 100000000``: each refused quickly in process, and by the CLI with exit status 2 and one
line on stderr. Then each piece: limits, JSON, numbers, sizes (the one parser that replaced
three), presets, the schedule and emulation-plan loaders, collcomm-perf's and the sweep's
arguments, COLLCOMM_FAULTS sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from fractions import Fraction

import pytest

from collcomm.cli import build_preset, main
from collcomm.cli.errors import UsageError as CliUsageError
from collcomm.emulation.plan import EmulationError, FabricPlan, PlanError, plan
from collcomm.errors import CollectiveError, ScheduleError, TopologyError
from collcomm.faults import inject
from collcomm.inputs import (Limits, SizeError, exact_number, finite_float, float_from_text, integer_from_text,
                             one_line, parse_json, parse_size, read_bounded, shown)
from collcomm.perf import options as perf_options
from collcomm.schedules import ir
from collcomm.topology import jsonio, make_preset
from collcomm.topology import presets as P

FAST = 1.0  # seconds: what "refused quickly" means here (the hang it replaces never ended)


def doc(links=None, nodes=None, **extra) -> dict:
    return {"format": "collcomm.topology/1", "name": "t",
            "nodes": nodes if nodes is not None else [{"id": "a"}, {"id": "b"}],
            "links": links if links is not None else [{"src": "a", "dst": "b", "bandwidth": 1}], **extra}


def with_link(**fields) -> str:
    return json.dumps(doc([{"src": "a", "dst": "b", "bandwidth": 1, **fields}]))


def refused(call, error=CollectiveError):
    """(message, seconds) of ``call()``, which must raise ``error`` within FAST seconds."""
    t0 = time.perf_counter()
    with pytest.raises(error) as info:
        call()
    elapsed = time.perf_counter() - t0
    assert elapsed < FAST, f"took {elapsed:.2f} s"
    message = str(info.value)
    assert "\n" not in message and len(message) < 1000, message
    return message


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "collcomm.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


# ============================================================================ the issue's examples
HUGE_EXPONENT = with_link(bandwidth="1e99999999999")
NESTED_2000 = json.dumps(doc())[:-1] + ', "x": ' + "[" * 2000 + "]" * 2000 + "}"
DIGITS_5000 = with_link().replace('"bandwidth": 1', '"bandwidth": ' + "7" * 5000)
LATENCY_1E400 = with_link().replace('"bandwidth": 1', '"bandwidth": 1, "latency_us": 1' + "0" * 400)

ISSUE_FILES = {
    # file text, words the message must hold (the field and the limit)
    "exponent.json": (HUGE_EXPONENT, ["link 0 (a -> b): bandwidth", "COLLCOMM_MAX_NUMBER_DIGITS"]),
    "nested.json": (NESTED_2000, ["more than 64 deep", "COLLCOMM_MAX_JSON_DEPTH"]),
    "digits.json": (DIGITS_5000, ["links[0].bandwidth", "5000 digits", "COLLCOMM_MAX_NUMBER_DIGITS"]),
    "latency.json": (LATENCY_1E400, ["links[0].latency_us", "401 digits", "COLLCOMM_MAX_NUMBER_DIGITS"]),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(ISSUE_FILES))
def test_the_issues_bad_files_are_one_topology_error_naming_file_field_and_limit(tmp_path, name):
    text, words = ISSUE_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    message = refused(lambda: jsonio.load(path), TopologyError)
    assert message.startswith(f"{name}: "), message
    for w in words:
        assert w in message, message
    assert refused(lambda: jsonio.loads(text), TopologyError)  # the same from text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(ISSUE_FILES))
def test_the_issues_bad_files_on_the_command_line_exit_2_with_one_line(tmp_path, name):
    (tmp_path / name).write_text(ISSUE_FILES[name][0])
    for command in ("topology", "schedule"):
        r = run_cli(command, "--topology", name, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"collcomm: error: {name}: "), r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_latency_of_1e400_in_digits_under_a_raised_digit_limit_is_out_of_range(monkeypatch):
    monkeypatch.setenv("COLLCOMM_MAX_NUMBER_DIGITS", "1000")  # then the number parses, and float() overflows
    message = refused(lambda: jsonio.loads(LATENCY_1E400), TopologyError)
    assert "link 0 (a -> b): latency_us must be a finite number >= 0 and <= 1e+09" in message


@pytest.mark.timeout(30)
def test_a_huge_exponent_via_param_is_a_topology_error_at_once():
    message = refused(lambda: build_preset("ring", params=["bandwidth=1e99999999999"]), TopologyError)
    assert "--param bandwidth" in message and "COLLCOMM_MAX_NUMBER_DIGITS" in message
    refused(lambda: make_preset("ring", bandwidth="1e99999999999"), TopologyError)  # the Python API too
    refused(lambda: build_preset("leaf-spine", params=["oversubscription=1e-99999999999"]), TopologyError)


@pytest.mark.timeout(30)
def test_a_hundred_million_ranks_is_refused_before_anything_is_built():
    message = refused(lambda: build_preset("ring", ranks=100_000_000), TopologyError)
    assert "--ranks 100000000" in message and "65536" in message and "COLLCOMM_MAX_NODES" in message
    message = refused(lambda: make_preset("ring", ranks=100_000_000), TopologyError)
    assert "ranks=100000000" in message and "COLLCOMM_MAX_NODES" in message


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv, words", [
    (["--preset", "ring", "--ranks", "100000000"], ["--ranks 100000000", "COLLCOMM_MAX_NODES"]),
    (["--preset", "torus", "--ranks", "100000000"], ["--ranks 100000000", "COLLCOMM_MAX_NODES"]),
    (["--preset", "ring", "--param", "bandwidth=1e99999999999"], ["--param bandwidth", "COLLCOMM_MAX_NUMBER_DIGITS"]),
    (["--preset", "ring", "--param", "latency_us=1e400"], ["--param latency_us", "finite"]),
    (["--preset", "hypercube", "--param", "dim=1000000"], ["dim=1000000", "COLLCOMM_MAX_NODES"]),
    (["--preset", "fully-connected", "--ranks", "5000"], ["ranks=5000", "links", "COLLCOMM_MAX_LINKS"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else "")
def test_oversized_presets_exit_2_with_one_line(argv, words):
    t0 = time.perf_counter()
    r = run_cli("topology", *argv)
    assert time.perf_counter() - t0 < 30
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("collcomm: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for w in words:
        assert w in r.stderr, r.stderr


# ============================================================================ presets: every size parameter
OVERSIZED = [
    ("star", {"ranks": 70000}, ["ranks=70000"]),
    ("ring", {"ranks": 70000}, ["ranks=70000"]),
    ("oneway-ring", {"ranks": 70000}, ["ranks=70000"]),
    ("torus", {"rows": 300, "cols": 300}, ["rows=300, cols=300", "90000 nodes"]),
    ("torus", {"rows": 10**30}, ["rows="]),
    ("hypercube", {"dim": 17}, ["dim=17"]),
    ("hypercube", {"dim": 16}, ["dim=16", "links", "COLLCOMM_MAX_LINKS"]),
    ("fully-connected", {"ranks": 1000}, ["ranks=1000", "499500 links"]),
    ("leaf-spine", {"leaves": 300, "hosts_per_leaf": 300}, ["leaves=300, hosts_per_leaf=300"]),
    ("leaf-spine", {"spines": 10**9}, ["spines=1000000000"]),
    ("two-clusters", {"ranks_per_cluster": 1000}, ["ranks_per_cluster=1000", "links"]),
    ("dgx-a100", {"boxes": 5000}, ["boxes=5000"]),
    ("dgx-h100", {"boxes": 5000}, ["boxes=5000"]),
    ("mi250", {"boxes": 5000}, ["boxes=5000"]),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, params, words", OVERSIZED, ids=[f"{n}-{'-'.join(p)}" for n, p, _ in OVERSIZED])
def test_every_size_parameter_of_every_preset_is_bounded(name, params, words):
    message = refused(lambda: make_preset(name, **params), TopologyError)
    for w in words:
        assert w in message, message
    assert "COLLCOMM_MAX_NODES" in message or "COLLCOMM_MAX_LINKS" in message


def test_preset_limits_follow_the_environment(monkeypatch):
    assert make_preset("ring", ranks=64).num_ranks == 64
    monkeypatch.setenv("COLLCOMM_MAX_NODES", "32")
    assert "the limit is 32 (COLLCOMM_MAX_NODES)" in refused(lambda: make_preset("ring", ranks=64), TopologyError)
    monkeypatch.setenv("COLLCOMM_MAX_NODES", "lots")
    assert "COLLCOMM_MAX_NODES" in refused(lambda: make_preset("ring", ranks=4))


@pytest.mark.parametrize("params, words", [
    ({"bandwidth": 0}, "bandwidth must be positive"),
    ({"bandwidth": "1e13"}, "bandwidth must be at most 1e+12"),
    ({"latency_us": float("nan")}, "latency_us must be a finite number"),
    ({"latency_us": -1.0}, "latency_us must be a finite number >= 0"),
    ({"bidirectional": "yes"}, "bidirectional must be true or false"),
])
def test_preset_numbers_are_checked_like_a_files(params, words):
    assert words in refused(lambda: make_preset("ring", **params), TopologyError)


def test_tiny_and_huge_bandwidths_within_the_range_stay_exact():
    assert make_preset("ring", ranks=3, bandwidth="1e-90").capacity[("r0", "r1")] == Fraction(1, 10**90)
    assert make_preset("ring", ranks=3, bandwidth="1e12").capacity[("r0", "r1")] == 10**12


# ============================================================================ limits
def test_limits_defaults_environment_and_overrides(monkeypatch):
    for var in ("COLLCOMM_MAX_INPUT_BYTES", "COLLCOMM_MAX_NODES"):
        monkeypatch.delenv(var, raising=False)
    assert Limits.from_environment() == Limits()
    assert Limits().max_nodes == 65536 and Limits().max_json_depth == 64
    monkeypatch.setenv("COLLCOMM_MAX_INPUT_BYTES", "2K")
    monkeypatch.setenv("COLLCOMM_MAX_NODES", "3")
    limits = Limits.from_environment()
    assert (limits.max_input_bytes, limits.max_nodes) == (2048, 3)
    assert limits.describe("max_nodes") == "the limit is 3 (COLLCOMM_MAX_NODES)"
    assert limits.replace(max_nodes=5).max_nodes == 5
    with pytest.raises(CollectiveError, match="must be a positive integer"):
        Limits(max_nodes=0)
    monkeypatch.setenv("COLLCOMM_MAX_JSON_DEPTH", "-1")
    with pytest.raises(CollectiveError, match="COLLCOMM_MAX_JSON_DEPTH"):
        Limits.from_environment()


def test_topology_counts_are_capped(monkeypatch):
    three = json.dumps(doc(nodes=[{"id": "a"}, {"id": "b"}, {"id": "c"}],
                           links=[{"src": "a", "dst": "b", "bandwidth": 1}, {"src": "b", "dst": "c", "bandwidth": 1}]))
    assert jsonio.loads(three).num_ranks == 3
    assert "'nodes' has 3 entries; the limit is 2 (COLLCOMM_MAX_NODES)" in refused(
        lambda: jsonio.loads(three, Limits(max_nodes=2)), TopologyError)
    assert "'links' has 2 entries; the limit is 1 (COLLCOMM_MAX_LINKS)" in refused(
        lambda: jsonio.loads(three, Limits(max_links=1)), TopologyError)
    monkeypatch.setenv("COLLCOMM_MAX_NODES", "2")
    assert "COLLCOMM_MAX_NODES" in refused(lambda: jsonio.loads(three), TopologyError)
    many_hints = json.dumps(doc(automorphisms=[{}] * 65))
    assert "'automorphisms' has 65 entries" in refused(lambda: jsonio.loads(many_hints), TopologyError)


@pytest.mark.parametrize("fields, words", [
    ({"bandwidth": "1/3" + "0" * 100}, "has more than 100 digits"),
    ({"bandwidth": True}, "bandwidth must be a number"),
    ({"bandwidth": "NaN"}, "bandwidth must be a number"),
    ({"bandwidth": "1/0"}, "a zero denominator"),
    ({"bandwidth": 1e13}, "bandwidth must be at most 1e+12"),
    ({"latency_us": 2e9}, "latency_us must be a finite number >= 0 and <= 1e+09"),
    ({"latency_us": "1"}, "latency_us must be a finite number"),
    ({"src": "a" * 10**5}, "'src' must be a string of 1 to 256 printable characters"),
    ({"src": "a\nb"}, "printable"),
    ({"duplex": [1] * 10**5}, "list of 100000 entries"),
])
def test_bad_link_fields_name_the_field_and_stay_one_short_line(fields, words):
    message = refused(lambda: jsonio.loads(with_link(**fields)), TopologyError)
    assert words in message, message


def test_bandwidths_whose_common_denominator_explodes_are_refused():
    primes = [1000003, 1000033, 1000037, 1000039, 1000081, 1000099, 1000117, 1000121, 1000133, 1000151,
              1000159, 1000171, 1000183, 1000187, 1000193, 1000199, 1000211]
    links = [{"src": "a", "dst": "b", "bandwidth": f"1/{p}"} for p in primes]
    assert jsonio.loads(json.dumps(doc(links[:3]))).capacity[("a", "b")] == sum(Fraction(1, p) for p in primes[:3])
    message = refused(lambda: jsonio.loads(json.dumps(doc(links))), TopologyError)
    assert "common denominator has more than 100 digits" in message


def test_files_that_are_no_topology_file(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'{"name": "\xe9"}')
    assert "not UTF-8" in refused(lambda: jsonio.load(tmp_path / "latin1.json"), TopologyError)
    assert "IsADirectoryError" in refused(lambda: jsonio.load(tmp_path), TopologyError)
    assert "does not exist" in refused(lambda: jsonio.load(tmp_path / "nope.json"), TopologyError)
    big = tmp_path / "big.json"
    big.write_text(with_link() + " " * 5000)
    assert jsonio.load(big).num_ranks == 2
    message = refused(lambda: jsonio.load(big, Limits(max_input_bytes=4096)), TopologyError)
    assert "bytes; the limit is 4096 (COLLCOMM_MAX_INPUT_BYTES)" in message
    message = refused(lambda: read_bounded("/dev/zero", what="topology file", error=TopologyError,
                                           limits=Limits(max_input_bytes=1 << 20)), TopologyError)
    assert "'/dev/zero' has more than 1048576 bytes" in message  # a device: read up to the limit only
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + with_link().encode())
    assert jsonio.load(bom).num_ranks == 2
    os.mkfifo(tmp_path / "fifo")  # nobody writes to it: refused at once, not a wait forever in open()
    assert "fifo: topology is not valid JSON" in refused(lambda: jsonio.load(tmp_path / "fifo"), TopologyError)


# ============================================================================ JSON
def test_json_depth_is_measured_without_recursion():
    assert parse_json("[" * 64 + "]" * 64, what="x", error=TopologyError) == eval("[" * 64 + "]" * 64)
    message = refused(lambda: parse_json("[" * 100000 + "]" * 100000, what="x", error=TopologyError), TopologyError)
    assert "more than 64 deep (line 1 column 65)" in message
    deep_in_strings = json.dumps({"a": "[" * 1000, "b": "{" * 1000 + '\\"' + "[" * 10})
    assert parse_json(deep_in_strings, what="x", error=TopologyError)["a"] == "[" * 1000
    assert "line 2 column 3" in refused(lambda: parse_json('[\n [[', what="x", error=TopologyError,
                                                           limits=Limits(max_json_depth=2)), TopologyError)


@pytest.mark.parametrize("text, words", [
    ('{"a": [NaN]}', "a[0]: NaN is not a number JSON allows"),
    ('{"a": {"b": -Infinity}}', "a.b: -Infinity is not a number"),
    ('{"a": 1e400}', "a: '1e400' is beyond the range of a float"),
    ('[' + "1" * 101 + ']', "[0]: a number of 101 digits; the limit is 100 (COLLCOMM_MAX_NUMBER_DIGITS)"),
    ('[0.' + "1" * 101 + ']', "[0]: a number of more than 100 digits"),
    ('{"a b": [1, 2, ' + "9" * 5000 + ']}', "'a b'[2]: a number of 5000 digits"),
    ('{"a": ', "is not valid JSON: Expecting value at line 1 column 7"),
])
def test_json_numbers_are_bounded_and_named_by_their_path(text, words):
    assert words in refused(lambda: parse_json(text, what="x", error=ScheduleError), ScheduleError)


def test_a_large_document_names_a_bad_number_by_line_and_column(monkeypatch):
    from collcomm.inputs import jsonparse

    monkeypatch.setattr(jsonparse, "NAMED_CHARS", 5)  # "large": past the size whose refusals get a path
    text = '{"a": "' + "9" * 200 + '",\n "b": [1, ' + "9" * 101 + "]}"
    assert "x: a number at line 2 column 11 has more than 100 digits" in refused(
        lambda: parse_json(text, what="x", error=TopologyError))
    assert "x: '1e400' is beyond the range" in refused(lambda: parse_json("[1, 1e400]", what="x", error=TopologyError))
    assert "x: NaN is not a number" in refused(lambda: parse_json("[NaN, 1]", what="x", error=TopologyError))
    assert parse_json('["' + "9" * 200 + '", 1e-300]', what="x", error=TopologyError)[1] == 1e-300


def test_json_within_the_limits_parses_as_json_does():
    text = json.dumps({"a": [1, -2.5, 1e-400, "NaN", None, True, {"b": [10**99]}]})
    assert parse_json(text, what="x", error=TopologyError) == json.loads(text)


# ============================================================================ numbers
@pytest.mark.parametrize("value, expected", [
    (3, Fraction(3)), ("25/2", Fraction(25, 2)), (" 12.5 ", Fraction(25, 2)), (0.1, Fraction(1, 10)),
    ("1e3", Fraction(1000)), ("-2.5e-1", Fraction(-1, 4)), (".5", Fraction(1, 2)), (Fraction(7, 3), Fraction(7, 3)),
    ("1e100", Fraction(10**100)),
])
def test_exact_numbers(value, expected):
    assert exact_number(value, "x", error=TopologyError) == expected


UNBUILT = [
    ("1e99999999999", "has more than 100 digits written out"),
    ("1e-99999999999", "has more than 100 digits written out"),
    ("0e99999999999", "has more than 100 digits written out"),
    ("1e" + "9" * 10**5, "has more than 100 digits written out"),
    ("9" * 10**6, "has more than 100 digits written out"),
    ("9" * 100 + "e100", "has more than 100 digits written out"),  # 200 digits: the digits and the exponent count
    ("0." + "1" * 99 + "e-100", "has more than 100 digits written out"),
    (10**5000, "an integer of about 5000 digits"),
    (Fraction(1, 10**200), "has more than 100 digits"),
    (float("inf"), "must be a finite number"),
    ("inf", "must be a number"),
    ("1/0", "zero denominator"),
    (None, "must be a number"),
    (True, "must be a number"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value, words", UNBUILT, ids=[shown(v, 24) for v, _ in UNBUILT])
def test_exact_numbers_refused_before_they_are_built(value, words):
    assert words in refused(lambda: exact_number(value, "x", error=TopologyError), TopologyError)


def test_floats_and_integers_from_text_and_ranges():
    assert finite_float(3, "x", error=TopologyError, low=0, high=5) == 3.0
    assert "x must be a finite number >= 0 and <= 5, got 6" in refused(
        lambda: finite_float(6, "x", error=TopologyError, low=0, high=5))
    assert "an integer of about" in refused(lambda: finite_float(10**400, "x", error=TopologyError))
    assert float_from_text("1e-3", "x", error=TopologyError) == 0.001
    for text in ("1e99999999999", "nan", "-inf"):
        assert "must be a finite number" in refused(lambda: float_from_text(text, "x", error=TopologyError))
    assert integer_from_text(" -12 ", "x", error=TopologyError) == -12
    assert "x must be at least 0" in refused(lambda: integer_from_text("-1", "x", error=TopologyError, low=0))
    assert "more than 100 digits" in refused(lambda: integer_from_text("9" * 5000, "x", error=TopologyError))
    assert "x must be an integer" in refused(lambda: integer_from_text("1.5", "x", error=TopologyError))


def test_values_in_messages_are_short_and_on_one_line():
    assert shown("ok") == "'ok'"
    long = shown("a\n\x1b[31m" * 10**6)
    assert len(long) < 100 and "\n" not in long and "\x1b" not in long and "characters" in long
    assert shown(10**10000) == "an integer of about 10000 digits"
    assert shown(list(range(10**5))) == "list of 100000 entries"
    assert shown(Fraction(-25, 2)) == "-25/2" and shown(Fraction(3)) == "3"  # as typed, not Fraction(-25, 2)
    assert shown(Fraction(10**10000 + 1, 3)) == "a fraction of about 10000 digits"
    assert "\n" not in one_line("a\nb\u2028c") and len(one_line("x" * 10**5)) < 1100


# ============================================================================ sizes: one parser for three callers
@pytest.mark.parametrize("text, expected", [
    ("123", 123), ("1K", 1024), ("1k", 1024), ("1.5M", 3 << 19), ("2g", 2 << 30), ("4KB", 4096), ("4KiB", 4096),
    ("4kib", 4096), (" 64 M ", 64 << 20), ("1T", 1 << 40), ("1P", 1 << 50), ("1e3", 1000), ("2.5e1K", 25 * 1024),
    ("0.3K", 307), (".5K", 512), ("0", 0), ("1e-99999999999", 0), ("64B", 64), ("7.", 7),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text, words", [
    ("12X", "not a size"), ("-1K", "not a size"), ("1.5.3M", "not a size"), ("4iB", "not a size"), ("", "not a size"),
    (".", "not a size"), ("1KK", "not a size"), ("nan", "not a size"), ("inf", "not a size"), ("١٢", "not a size"),
    ("1" * 200, "not a size"), ("1e99999999999", "more than the maximum"), ("2P", "more than the maximum"),
])
def test_bad_sizes(text, words):
    assert words in refused(lambda: parse_size(text), SizeError)


def test_size_maximum_is_the_callers_or_the_limit(monkeypatch):
    assert "1024 bytes (1K)" in refused(lambda: parse_size("2K", maximum=1024), SizeError)
    monkeypatch.setenv("COLLCOMM_MAX_SIZE_BYTES", "1M")
    assert parse_size("1M") == 1 << 20
    assert "(1M)" in refused(lambda: parse_size("1025K"), SizeError)


def test_the_callers_keep_their_error_types_and_wording():
    assert perf_options.parse_size("1.5M", "-b") == 3 << 19
    assert "-e '12X' is not a size" in refused(lambda: perf_options.parse_size("12X", "-e"),
                                               perf_options.UsageError)
    assert "-b '1e99999999999' is more than the maximum" in refused(
        lambda: perf_options.parse_size("1e99999999999", "-b"), perf_options.UsageError)
    assert inject.parse("reset:0->1:after=2k").rules[0].after == 2048
    message = refused(lambda: inject.parse("reset:0->1:after=1e99999999999"), ValueError)
    assert message.startswith("COLLCOMM_FAULTS: bad size in") and "more than the maximum" in message


def test_the_sweep_refuses_bad_sizes_and_a_factor_that_never_grows_before_init(capsys):
    from collcomm import sweep

    for argv, words in ((["--min", "12X"], "not a size"), (["--factor", "1"], "--factor"),
                        (["--max", "1e99999999999"], "more than the maximum"), (["--min", "2M", "--max", "1M"],
                                                                                 "more than --max")):
        with pytest.raises(SystemExit) as info:
            sweep.main(argv)
        assert info.value.code == 2
        assert words in capsys.readouterr().err


# ============================================================================ collcomm-perf's arguments
@pytest.mark.parametrize("argv, words", [
    (["-np", "100000"], "must be at most 1024"),
    (["-np", "9" * 5000], "expected an integer"),
    (["-n", "10000000"], "must be at most 1000000"),
    (["-w", "-1"], "must be at least 0"),
    (["-N", "1e9"], "expected an integer"),
    (["-r", str(1 << 40)], "must be at most"),
    (["-T", "nan"], "finite number of seconds"),
    (["-T", "-5"], "positive"),
    (["-T", "1e99999"], "finite"),
    (["-T", "1e10"], "at most 1e+09"),
    (["-b", "1e99999999999"], "more than the maximum"),
    (["-i", "9" * 100], "not a size"),
    (["-f", "0"], "must be at least 1"),
])
def test_perf_arguments_are_bounded_usage_errors(argv, words):
    message = refused(lambda: perf_options.parse(argv), perf_options.UsageError)
    assert words in message, message


# ============================================================================ schedule/1
def nested(depth: int) -> list:
    out: list = []
    for _ in range(depth - 1):
        out = [out]
    return out


def _schedule_text() -> str:
    from collcomm.schedules import generate

    return ir.dumps(generate(P.ring(4), "allreduce", "ring"))


def test_a_schedule_round_trips_and_its_file_is_bounded(tmp_path):
    text = _schedule_text()
    assert ir.dumps(ir.loads(text)) == text
    path = tmp_path / "s.json"
    path.write_text(text)
    assert ir.load(path).num_ranks == 4
    message = refused(lambda: ir.load(path, Limits(max_input_bytes=100)), ScheduleError)
    assert "COLLCOMM_MAX_INPUT_BYTES" in message
    assert "does not exist" in refused(lambda: ir.load(tmp_path / "nope.json"), ScheduleError)
    assert "IsADirectoryError" in refused(lambda: ir.load(tmp_path), ScheduleError)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("change, words", [
    (lambda d: d["phases"][0]["trees"][0].update(share="1e99999999999"), "share has more than 100 digits"),
    (lambda d: d["phases"][0]["trees"][0].update(share="2"), "share must be at most 1"),
    (lambda d: d["phases"][0]["trees"][0].update(share=0.5), "expected an exact number"),
    (lambda d: d["phases"][0]["trees"][0].update(share="0"), "share must be positive"),
    (lambda d: d.update(algbw="-1"), "algbw must be positive"),
    (lambda d: d.update(generation_seconds="NaN"), "'generation_seconds' must be a number of seconds"),
    (lambda d: d.update(generation_seconds=[1]), "'generation_seconds' must be a number of seconds"),
    (lambda d: d.update(info="abc"), "'info' must be an object"),
    (lambda d: d.update(algorithm=["x"]), "'algorithm' must be a string"),
    (lambda d: d.update(compute_nodes=["a\nb"]), "printable"),
    (lambda d: d.update(phases=[d["phases"][0]] * 3), "one or two phases"),
    (lambda d: d["phases"][0]["trees"][0]["edges"][0].update(path="ab"), "'path' must be a list"),
    (lambda d: d.update(x=nested(70)), "more than 64 deep"),
])
def test_bad_schedules_are_one_schedule_error_naming_the_field(change, words):
    d = json.loads(_schedule_text())
    change(d)
    message = refused(lambda: ir.loads(json.dumps(d)), ScheduleError)
    assert words in message, message


# ============================================================================ the emulation plan read back
def test_an_emulation_plan_round_trips():
    for topo in (P.leaf_spine(2, 2, 2), P.ring(4, bidirectional=False), P.dgx_a100(2)):
        p = plan(topo)
        assert FabricPlan.from_json(p.to_json()) == p


@pytest.mark.parametrize("change, words", [
    (lambda d: d["routes"][0].append("10.0.0.1/32 dev e1\nlink del lo"), "'routes'"),
    (lambda d: d["namespaces"].__setitem__(0, "other-0"), "'namespaces' must be"),
    (lambda d: d["addresses"].__setitem__(1, "10.250.0.999"), "addresses[1]"),
    (lambda d: d["address_iface"].__setitem__(0, "eth0; reboot"), "address_iface[0]"),
    (lambda d: d["veths"][0].update(a_bits=10**99), "veths[0]"),
    (lambda d: d["veths"][0].update(b=99), "veths[0]"),
    (lambda d: d.update(prefix="Bad-1"), "'prefix'"),
    (lambda d: d.update(num_ranks=-1), "'num_ranks'"),
    (lambda d: d.update(mgmt_host="10.0.0.1 dev x"), "'mgmt_host'"),
    (lambda d: d.update(scale_bits_per_gbps="1e99999999999"), "more than 100 digits"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d.pop("veths"), "missing 'veths'"),
])
def test_a_tampered_plan_is_a_plan_error_naming_the_field(change, words):
    d = json.loads(plan(P.leaf_spine(2, 2, 2)).to_json())
    change(d)
    message = refused(lambda: FabricPlan.from_json(json.dumps(d)), PlanError)
    assert words in message, message
    assert issubclass(PlanError, EmulationError) and issubclass(PlanError, ValueError)


def test_param_values_that_are_no_number_stay_usage_errors():
    for param, words in (("ranks=many", "ranks=many"), ("bandwidth=0x10", "expected an integer"),
                         ("latency_us=fast", "expects a number"), ("bidirectional=2", "true or false")):
        assert words in refused(lambda: build_preset("ring", params=[param]), CliUsageError)
    assert main(["topology", "--preset", "ring", "--param", "ranks=" + "9" * 5000]) == 2


# ============================================================================ the rest of the readers
# A Topology built in Python (not from a file) reads its numbers through collcomm.inputs too.
def two_nodes_with(**link):
    from collcomm.topology.model import Link, Node, Topology

    return lambda: Topology("t", [Node("a"), Node("b")], [Link("a", "b", **{"bandwidth": 1, **link})])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bandwidth", ["1e99999999999", "1e-99999999999", " 0e99999999999", "7" * 5000],
                         ids=lambda v: shown(v, 24))
def test_a_topology_built_in_python_refuses_a_bandwidth_of_too_many_digits_at_once(bandwidth):
    message = refused(two_nodes_with(bandwidth=bandwidth), TopologyError)  # Fraction(text) never ended
    assert message.startswith("link 0 (a -> b): bandwidth has more than 100 digits"), message
    assert "COLLCOMM_MAX_NUMBER_DIGITS" in message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("latency", [10**400, -(10**400), float("inf"), float("nan"), -1, "1", True, None],
                         ids=lambda v: shown(v, 24))
def test_a_topology_built_in_python_refuses_a_latency_past_a_float_as_a_topology_error(latency):
    message = refused(two_nodes_with(latency_us=latency), TopologyError)  # 10**400: OverflowError before
    assert message.startswith("link 0 (a -> b): latency_us must be a finite number >= 0, got "), message


@pytest.mark.parametrize("bandwidth, words", [
    (0, "bandwidth must be positive"), (-3, "bandwidth must be positive"), ("0/5", "bandwidth must be positive"),
    (10**400, "bandwidth must be at most 1e+12, got an integer of about 400 digits"),
    ("1e13", "bandwidth must be at most 1e+12"), (float("inf"), "bandwidth must be a finite number"),
    ("fast", 'bandwidth must be a number or a fraction like "25/2", got \'fast\''), (True, "bandwidth must be a number"),
    (None, "bandwidth must be a number"), ("1/0", "a zero denominator"),
], ids=lambda v: shown(v, 24))
def test_a_topology_built_in_python_checks_bandwidths_like_a_file(bandwidth, words):
    assert words in refused(two_nodes_with(bandwidth=bandwidth), TopologyError)


def test_a_topology_built_in_python_keeps_exact_bandwidths_and_latencies():
    topo = two_nodes_with(bandwidth="25/2", latency_us=3)()
    assert topo.capacity[("a", "b")] == Fraction(25, 2) and topo.latency_us[("a", "b")] == 3.0
    assert two_nodes_with(bandwidth=0.1)().capacity[("a", "b")] == Fraction(1, 10)
    # An already built Fraction keeps its digits (code that scales bandwidths, a reroute, makes long ones).
    long = Fraction(1, 3**300)
    assert two_nodes_with(bandwidth=long)().capacity[("a", "b")] == long
    assert jsonio.MAX_BANDWIDTH == 10**12  # one bound for files and for Python


@pytest.mark.timeout(30)
def test_the_emulation_state_file_is_read_bounded(tmp_path, monkeypatch):
    """A FIFO in place of the state file, with a writer that never closes it: reading it to the end
    (before: path.read_text()) never ends; a bounded read stops past the limit."""
    from collcomm.emulation import netns

    monkeypatch.setattr(netns, "STATE_DIR", tmp_path)
    monkeypatch.setenv("COLLCOMM_MAX_INPUT_BYTES", "4096")
    os.mkfifo(netns.state_file("ccfz"))
    writer = os.open(netns.state_file("ccfz"), os.O_RDWR | os.O_NONBLOCK)  # keeps a writer: no end of file
    try:
        written = os.write(writer, b" " * 32768)
        t0 = time.perf_counter()
        assert netns.current("ccfz") is None  # "no fabric": the plan is refused (PlanError, a ValueError)
        assert time.perf_counter() - t0 < FAST
        left = len(os.read(writer, 1 << 20))
        assert 0 < left <= written - 4097, f"{written - left} of {written} bytes were read"
    finally:
        os.close(writer)
    netns.state_file("ccfz").unlink()
    netns.state_file("ccfz").write_text("{" * 100)  # and a file that is no plan is no fabric either
    assert netns.current("ccfz") is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text, words", [
    ("delay:0->1:ms=inf", "delay needs ms >= 0 and <= 1e+12"),  # time.sleep(inf): OverflowError mid-send
    ("delay:0->1:ms=-inf", "delay needs ms >= 0"),
    ("delay:0->1:ms=nan", "delay needs ms >= 0"),
    ("delay:0->1:ms=-5", "delay needs ms >= 0"),
    ("delay:0->1:ms=1e13", "delay needs ms >= 0 and <= 1e+12"),
    ("delay:0->1:ms=" + "9" * 5000, "delay needs ms >= 0"),
    ("throttle:0->1:bps=inf", "throttle needs a finite bps >= 1"),
    ("throttle:0->1:bps=nan", "throttle needs a finite bps >= 1"),
    ("throttle:0->1:bps=-1", "throttle needs a finite bps >= 1"),
    ("throttle:0->1:bps=1e-300", "throttle needs a finite bps >= 1"),  # a sleep of 1e300 s per frame
    ("corrupt:\u00b2->1", "bad rank '\u00b2'"),  # "²".isdigit(): int() raised its own ValueError
    ("corrupt:0->" + "9" * 5000, "bad rank '9999"),
])
def test_fault_plans_that_cannot_be_slept_are_refused_when_parsed(text, words):
    message = refused(lambda: inject.parse(text), ValueError)
    assert message.startswith("COLLCOMM_FAULTS: ") and words in message, message
    assert text[:20] in message  # names the bad part


def test_fault_plans_within_the_bounds_still_parse():
    rules = inject.parse("delay:0->1:ms=0;delay:1->0:ms=1e12;throttle:0->1:bps=1;throttle:1->0:bps=4e7").rules
    assert [r.ms for r in rules[:2]] == [0.0, 1e12] and [r.bps for r in rules[2:]] == [1.0, 4e7]
    assert inject.parse("drop:123456789->*").rules[0].src == 123456789
