"""The ``collcomm`` command line, run as a user would (subprocess) and in-process via main(argv).

Checks: topology -o/--show/--plot, preset sizing, schedule reports against the exact
optimum (DGX-A100 x2 allgather: 1040/3 GB/s), --compare, -o JSON that loads back and
validates, MSCCL XML, tree pictures, and that every bad input exits 2 with one line on
stderr and no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from fractions import Fraction

import pytest

import collcomm.schedules
from collcomm.cli import main, preset_arguments
from collcomm.schedules import ALGORITHMS, ir
from collcomm.schedules.evaluate import algbw, validate
from collcomm.topology import load, make_preset, save
from collcomm.topology.presets import PRESETS

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "collcomm.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def report(stdout: str) -> dict[str, str]:
    """The ``key   value`` lines of `collcomm schedule` as a dict."""
    out = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("  ")
        if value:
            out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------- topology
def test_topology_saves_shows_and_plots(tmp_path):
    r = run_cli("topology", "--preset", "dgx-a100", "--boxes", "2", "-o", "t.json", "--show", "--plot", "t.png",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    topo = load(tmp_path / "t.json")
    assert topo == make_preset("dgx-a100", boxes=2)
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG
    text = r.stdout
    assert "dgx-a100x2" in text
    assert "ranks      16: box0.gpu0" in text
    assert "switches   20" in text
    assert "box0, box1 (8 ranks, 9 switches each)" in text
    assert "300 GB/s    16 duplex" in text and "25 GB/s    32 duplex" in text
    assert "ranks 0-15    325 / 325 GB/s" in text
    assert "group of order 16" in text


def test_topology_show_is_the_default_and_reads_files(tmp_path, capsys):
    path = tmp_path / "ring.json"
    save(make_preset("oneway-ring", ranks=5, bandwidth=Fraction(5, 2)), path)
    assert main(["topology", "--topology", str(path)]) == 0
    out = capsys.readouterr().out
    assert "oneway-ring5" in out
    assert "5 (0 duplex, 5 one-way)" in out
    assert "5/2 (=2.5) GB/s" in out and "rank -> rank" in out
    assert "ranks 0-4" in out and "5/2 (=2.5) / 5/2 (=2.5) GB/s" in out


SIZED = {"star": {"ranks": 6}, "oneway-ring": {"ranks": 5}, "mi250": {"boxes": 2}, "leaf-spine": {"leaves": 3}}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_plot_topology_draws_every_preset(tmp_path, preset, capsys):
    kw = SIZED.get(preset, {})
    args = ["topology", "--preset", preset, "--plot", str(tmp_path / "f.png")]
    for k, v in kw.items():
        args += ["--param", f"{k}={v}"]
    assert main(args) == 0
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG
    assert capsys.readouterr().out.startswith("wrote ")


def test_sizing_flags_map_onto_preset_parameters():
    assert preset_arguments("dgx-a100", 4, None, []) == {"boxes": 4}
    assert preset_arguments("dgx-h100", None, 16, []) == {"boxes": 2}
    assert preset_arguments("mi250", None, 32, []) == {"boxes": 2}
    assert preset_arguments("star", None, 12, []) == {"ranks": 12}
    assert preset_arguments("two-clusters", None, 8, []) == {"ranks_per_cluster": 4}
    assert preset_arguments("hypercube", None, 16, []) == {"dim": 4}
    assert preset_arguments("torus", None, 12, []) == {"rows": 3, "cols": 4}
    assert preset_arguments("torus", None, 12, ["rows=2"]) == {"rows": 2, "cols": 6}
    assert preset_arguments("leaf-spine", 2, 8, []) == {"leaves": 2, "hosts_per_leaf": 4}
    got = preset_arguments("leaf-spine", None, None, ["oversubscription=3/2", "host_bandwidth=12.5",
                                                      "latency_us=2"])
    assert got == {"oversubscription": Fraction(3, 2), "host_bandwidth": Fraction(25, 2), "latency_us": 2.0}
    assert isinstance(got["latency_us"], float)
    assert preset_arguments("ring", None, None, ["bidirectional=false"]) == {"bidirectional": False}


# ---------------------------------------------------------------------------- schedule
def test_schedule_reports_the_exact_optimum_for_dgx_a100_x2():
    r = run_cli("schedule", "--preset", "dgx-a100", "--boxes", "2")
    assert r.returncode == 0, r.stderr
    rep = report(r.stdout)
    assert rep["optimum"].startswith("1040/3 GB/s = 346.667 GB/s")
    assert rep["achieved"] == "1040/3 GB/s = 346.667 GB/s"
    assert rep["ratio"].startswith("1 ")
    assert int(rep["trees"]) >= 16
    assert int(rep["trees/root"]) >= 1
    assert int(rep["max depth"]) >= 1
    assert "generated in" in r.stdout


def test_schedule_with_a_cap_on_trees_reports_the_fraction_kept(capsys):
    assert main(["schedule", "--preset", "dgx-a100", "--boxes", "2", "--max-trees-per-root", "1"]) == 0
    rep = report(capsys.readouterr().out)
    assert rep["trees/root"] == "1"
    kept = Fraction(rep["kept"].split()[0])
    assert 0 < kept < 1
    assert Fraction(rep["ratio"].split()[0]) == kept


def test_compare_lists_every_algorithm_with_forestcoll_optimal():
    r = run_cli("schedule", "--preset", "dgx-a100", "--boxes", "2", "--compare")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("allreduce on dgx-a100x2") and "520/3 GB/s" in lines[0]
    assert lines[1].split()[:3] == ["algorithm", "algbw", "GB/s"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split() and line.split()[0] in ALGORITHMS}
    assert set(rows) == set(ALGORITHMS)
    assert rows["forestcoll"][1] == "173.333" and rows["forestcoll"][2] == "1"
    for name, cells in rows.items():
        if cells[1] != "error:":
            assert 0 < float(cells[2]) <= 1, (name, cells)


def test_compare_shows_a_failing_algorithm_as_one_line(monkeypatch, capsys):
    real = collcomm.schedules.generate

    def flaky(topo, collective, name, **options):
        if name == "ring":
            raise ModuleNotFoundError("No module named 'collcomm.schedules.ring'")
        if name == "tree":
            raise RuntimeError("boom\nsecond line")
        return real(topo, collective, name, **options)

    monkeypatch.setattr(collcomm.schedules, "generate", flaky)
    assert main(["schedule", "--preset", "star", "--ranks", "4", "--compare", "--collective", "allgather"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "error: algorithm 'ring' is not available: No module named" in lines["ring"]
    assert lines["tree"].endswith("error: internal error: RuntimeError: boom second line")
    assert lines["forestcoll"].split()[2] == "1"


def test_schedule_json_loads_back_and_validates(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["schedule", "--preset", "hypercube", "--collective", "allreduce", "-o", str(out)]) == 0
    assert f"wrote {out} (collcomm.schedule/1)" in capsys.readouterr().out
    schedule = ir.load(out)
    topo = make_preset("hypercube")
    validate(schedule, topo)
    assert schedule.collective == "allreduce" and [p.collective for p in schedule.phases] == [
        "reduce_scatter", "allgather"]
    assert algbw(schedule, topo) == schedule.algbw


def test_schedule_from_a_topology_file(tmp_path, capsys):
    path = tmp_path / "t.json"
    save(make_preset("dgx-a100", boxes=2), path)
    assert main(["schedule", "--topology", str(path), "--collective", "reduce_scatter",
                 "-o", str(tmp_path / "s.json")]) == 0
    rep = report(capsys.readouterr().out)
    assert rep["optimum"].startswith("1040/3 GB/s") and rep["achieved"].startswith("1040/3 GB/s")
    validate(ir.load(tmp_path / "s.json"), load(path))


@pytest.mark.parametrize("how", [["--format", "msccl-xml", "-o", "s.out"], ["-o", "s.xml"]])
def test_schedule_writes_msccl_xml(tmp_path, capsys, how):
    args = ["schedule", "--preset", "dgx-a100", "--boxes", "2", "--collective", "allgather"]
    args += [str(tmp_path / a) if a.startswith("s.") else a for a in how]
    assert main(args) == 0
    assert "(MSCCL XML)" in capsys.readouterr().out
    path = tmp_path / how[-1]
    root = ET.parse(path).getroot()
    assert root.tag == "algo"
    assert root.get("ngpus") == "16" and root.get("coll") == "allgather"
    assert len(root.findall("gpu")) == 16


def test_schedule_plot_draws_trees(tmp_path, capsys):
    png = tmp_path / "trees.png"
    assert main(["schedule", "--preset", "dgx-a100", "--boxes", "2", "--collective", "allreduce", "--plot", str(png),
                 "--root", "box1.gpu3", "--phase", "reduce_scatter"]) == 0
    assert png.read_bytes()[:8] == PNG
    png2 = tmp_path / "ring.svg"
    assert main(["schedule", "--preset", "torus", "--algorithm", "ring", "--plot", str(png2), "--root", "5"]) == 0
    assert png2.read_text().lstrip().startswith("<?xml")
    assert "wrote" in capsys.readouterr().out


def test_help_and_ctrl_c(monkeypatch, capsys):
    assert main(["--help"]) == 0
    assert "schedule" in capsys.readouterr().out

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(collcomm.schedules, "generate", interrupted)
    assert main(["schedule", "--preset", "star"]) == 130
    captured = capsys.readouterr()
    assert captured.err == ""


# ---------------------------------------------------------------------------- bad input
TOPO = {"format": "collcomm.topology/1", "name": "t",
        "nodes": [{"id": "a"}, {"id": "b"}, {"id": "s", "kind": "switch"}],
        "links": [{"src": "a", "dst": "s", "bandwidth": 1}, {"src": "b", "dst": "s", "bandwidth": 1}]}


def _variant(**changes):
    d = json.loads(json.dumps(TOPO))
    for key, fn in changes.items():
        fn(d)
    return json.dumps(d)


FILES = {
    "malformed.json": '{"format": "collcomm.topology/1", "nodes": [',
    "unknown_node.json": _variant(x=lambda d: d["links"][0].update(dst="zz")),
    "zero_bw.json": _variant(x=lambda d: d["links"][0].update(bandwidth=0)),
    "negative_bw.json": _variant(x=lambda d: d["links"][0].update(bandwidth="-5/2")),
    "unreachable.json": _variant(x=lambda d: d.update(links=d["links"][:1])),
    "no_compute.json": _variant(x=lambda d: d.update(nodes=[{"id": "s", "kind": "switch"}], links=[])),
    "good.json": json.dumps(TOPO),
    "a_file": "",
}

BAD = [
    (["topology", "--topology", "malformed.json"], "not valid JSON"),
    (["schedule", "--topology", "unknown_node.json"], "unknown node 'zz'"),
    (["schedule", "--topology", "zero_bw.json"], "bandwidth must be positive"),
    (["topology", "--topology", "negative_bw.json", "--show"], "bandwidth must be positive"),
    (["schedule", "--topology", "unreachable.json"], "cannot reach"),
    (["topology", "--topology", "no_compute.json"], "no compute node"),
    (["topology", "--topology", "missing.json"], "does not exist"),
    (["schedule", "--topology", "missing.json", "--compare"], "does not exist"),
    (["topology", "--preset", "nope"], "invalid choice: 'nope'"),
    (["topology", "--preset", "star", "--param", "colour=3"], "no parameter 'colour'"),
    (["topology", "--preset", "star", "--param", "ranks=many"], "ranks=many"),
    (["topology", "--preset", "star", "--param", "bandwidth=0"], "bandwidth must be positive"),
    (["topology", "--preset", "star", "--param", "ranks=0"], "ranks must be an integer"),
    (["topology", "--preset", "star", "--boxes", "2"], "has no boxes"),
    (["topology", "--preset", "dgx-a100", "--ranks", "12"], "does not divide"),
    (["schedule", "--preset", "star", "--algorithm", "bogus"], "invalid choice: 'bogus'"),
    (["schedule", "--preset", "star", "--collective", "alltoall"], "invalid choice: 'alltoall'"),
    (["schedule", "--preset", "star", "--max-trees-per-root", "0"], "positive integer"),
    (["schedule", "--preset", "star", "--algorithm", "ring", "--max-trees-per-root", "2"], "forestcoll only"),
    (["schedule", "--topology", "good.json", "--boxes", "2"], "--preset"),
    (["schedule", "--preset", "star", "--plot", "x.png", "--root", "99"], "--root 99"),
    (["topology", "--preset", "star", "-o", "no_such_dir/t.json"], "does not exist"),
    (["topology", "--preset", "star", "-o", "a_file/t.json"], "is not a directory"),
    (["schedule", "--preset", "star", "-o", "."], "is a directory"),
    (["topology", "--preset", "star", "--plot", "fabric.gif"], "unknown image format"),
    (["schedule", "--preset", "star", "--format", "json"], "give -o"),
    (["schedule", "--preset", "star", "--compare", "-o", "s.json"], "leave out -o"),
    (["schedule"], "--topology --preset is required"),
    ([], "required"),
    (["topology", "--preset", "star", "--frobnicate"], "unrecognized arguments"),
    # emulation flags: checked before anything starts (and before the root check), as collcomm-perf checks them
    (["run", "-n", "2", "--scale", "1GB/s=10Mbit", "true"], "--scale applies to --emulate only"),
    (["run", "-n", "2", "--prefix", "ccx", "true"], "--prefix applies to --emulate only"),
    (["run", "-n", "2", "--emulate", "good.json", "--scale", "fast", "true"], "--scale must look like"),
    (["run", "-n", "2", "--emulate", "good.json", "--prefix", "Bad-1", "true"], "emulation prefix must be"),
    (["emulate", "up", "good.json", "--scale", "1GB/s=-1Mbit"], "--scale must look like"),
    (["emulate", "up", "good.json", "--prefix", "x"], "emulation prefix must be"),
    (["topology", "--probe", "-np", "2", "--scale", "1GB/s=10Mbit"], "--scale applies to --emulate only"),
    (["topology", "--probe", "--emulate", "good.json", "--prefix", "toolongname"], "emulation prefix must be"),
]


@pytest.fixture
def bad_files(tmp_path, monkeypatch):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a) or "(nothing)" for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(bad_files, capsys, argv, words):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("collcomm: error: ")
    assert words in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_a_missing_plotting_library_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scipy", None)  # networkx's kamada_kawai_layout imports it
    assert main(["topology", "--preset", "hypercube", "--plot", str(tmp_path / "h.png")]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "cannot draw" in captured.err and "scipy" in captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "h.png").exists()


@pytest.mark.parametrize("argv", [["topology", "--topology", "malformed.json"],
                                  ["schedule", "--topology", "unreachable.json", "--compare"],
                                  ["schedule", "--preset", "nope"],
                                  ["topology", "--preset", "star", "-o", "no_such_dir/t.json"]])
def test_bad_input_in_a_subprocess(bad_files, argv):
    r = run_cli(*argv, cwd=bad_files)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("collcomm: error: ")
    assert "Traceback" not in r.stderr and r.stdout == ""
