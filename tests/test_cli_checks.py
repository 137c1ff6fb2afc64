"""The ``largeep`` command refuses bad input before any rank starts: argparse's error naming the flag and the value,
exit status 2, no traceback; a JSON or YAML file that does not parse is named with its line.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import largeep_plugin.commands.demo as demo
from largeep_plugin.cli import main
from largeep_plugin.placement.files import read_json, read_yaml
from largeep_plugin.placement.topology import load_topology

TOPOLOGY = str(Path(__file__).resolve().parents[1] / "examples" / "topologies" / "2x8_h100.yaml")

BAD_FLAGS = [
    (["demo", "--bias-update-rate", "-1"], "argument --bias-update-rate: must be a finite number >= 0, got '-1'"),
    (["demo", "--vocab-size", "1"], "argument --vocab-size: must be an integer >= 4, got '1'"),
    (["demo", "--compare-ep", "0"], "argument --compare-ep: must be a comma-separated list of integers >= 2, got '0'"),
    (["demo", "--compare-ep", "4,eight"], "argument --compare-ep: must be a comma-separated list of integers >= 2"),
    (["demo", "--timeout", "0"], "argument --timeout: must be a finite number > 0, got '0'"),
    (["demo", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["demo", "--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (["bench", "layer", "--ep", "1"], "argument --ep: must be a comma-separated list of integers >= 2, got '1'"),
    (["bench", "layer", "--top-k", "3"], "argument --top-k: invalid choice: 3"),
    (["bench", "overlap", "--chunks", "0,1"], "argument --chunks: must be a comma-separated list of integers >= 1"),
    (["bench", "overlap", "--timeout", "-5"], "argument --timeout: must be a finite number > 0, got '-5'"),
    (["cluster", "run", "--nodes", "0", "--ranks-per-node", "2", "--", "true"],
     "argument --nodes: must be an integer >= 1, got '0'"),
    (["plan", "--num-experts", "0"], "argument --num-experts: must be an integer >= 1, got '0'"),
    (["plan", "--bytes-per-token", "inf"], "argument --bytes-per-token: must be a finite number > 0, got 'inf'"),
    (["simulate", "--preset", "source", "--nodes", "0"], "argument --nodes: must be an integer >= 1, got '0'"),
    (["simulate", "--preset", "source", "--chunks", "1"], "argument --chunks: must be an integer >= 2, got '1'"),
]


@pytest.fixture
def no_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a world fails the test: every check here must come first."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a world was started before the flags were checked")
    monkeypatch.setattr(demo, "run_world", refuse)


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_a_bad_flag_is_an_argparse_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                         no_ranks: None) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--world-size", "1"], "--top-k=2 must be <= --world-size=1"),
    (["demo", "--hidden-size", "30"], "--hidden-size=30 must be a multiple of --num-heads=4"),
    (["demo", "--world-size", "4", "--top-k", "3"], "--top-k=3: the comparison's stock MoE takes top-1 or top-2"),
    (["bench", "overlap", "--chunks", "2,4"], "--chunks=2,4 must include 1"),
])
def test_flags_wrong_together_are_refused_before_any_rank(argv: list[str], message: str,
                                                          capsys: pytest.CaptureFixture[str], no_ranks: None) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_command_itself_exits_2_without_a_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "largeep_plugin.cli", "demo", "--vocab-size", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert "argument --vocab-size: must be an integer >= 4, got '1'" in out.stderr and "Traceback" not in out.stderr


def test_plan_names_the_file_and_line_of_a_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text("name: t\nnodes: 2\ngpus_per_node: [4\nintra_node: {bandwidth_gbytes_per_s: 1}\n")
    assert main(["plan", "--topology", str(topo), "--num-experts", "8"]) == 2
    err = capsys.readouterr().err
    assert f"{topo}: not valid YAML at line 4, column 11" in err and "Traceback" not in err, err

    load = tmp_path / "load.json"
    load.write_text("[1, 2, 3,\n 4]]\n")
    assert main(["plan", "--topology", TOPOLOGY, "--load", str(load)]) == 2
    err = capsys.readouterr().err
    assert f"{load}: not valid JSON at line 2, column 4: Extra data" in err and "Traceback" not in err, err


def test_file_readers_name_the_file(tmp_path: Path) -> None:
    bad_json, bad_yaml, binary = tmp_path / "a.json", tmp_path / "b.yaml", tmp_path / "c.json"
    bad_json.write_text('{"x": 1,}')
    bad_yaml.write_text("a: b: c\n")
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"a\.json: not valid JSON at line 1, column 9"):
        read_json(bad_json)
    with pytest.raises(ValueError, match=r"b\.yaml: not valid YAML at line 1, column 5"):
        read_yaml(bad_yaml)
    with pytest.raises(ValueError, match=r"b\.yaml: not valid YAML"):
        load_topology(bad_yaml)
    with pytest.raises(ValueError, match=r"c\.json: not a UTF-8 text file"):
        read_json(binary)
