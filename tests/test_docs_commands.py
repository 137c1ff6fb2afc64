"""Every command the documentation shows runs as written (tests/docs_commands.py: where commands are, and the
``needs:`` marker of a command that cannot run on a CPU machine).

Each command runs once, with bash, in document order, in one scratch copy of the repository: the files the commands
write (``runs/...``) never land in the checkout, and a later command finds what an earlier one wrote, as a reader
following the page does. The command text is not touched; the environment adds
    LARGEEP_DOCS_QUICK=1   the long commands cap their steps, timed iterations and restarts (tools/docs_quick.py)
    PYTHONPATH             the copy first, so that the code run is this checkout's
    PET_STANDALONE=1       torchrun's --standalone: the OS picks its port, where the default 29500 (or a port
                           chosen here and bound a second later) can collide with any other job on the machine
Skipped, each with its reason: a command marked ``needs:``, and pytest itself (this check's own runner). The
environment this check runs in is the one ``bash scripts/setup.sh`` made, so ``bash scripts/setup.sh && X`` runs X.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess

import pytest

from docs_commands import ROOT, Command, all_commands, docstring_commands, markdown_commands, occurrences, strip_comment
from largeep_plugin.tools.docs_quick import QUICK_ENV, shorten

pytestmark = pytest.mark.docs
COMMANDS = all_commands()
SETUP = "bash scripts/setup.sh"
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = tmp_path_factory.mktemp("docs") / "repo"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info",
                                                              ".pytest_cache", "build", "dist", ".venv"))
    return str(dest)


def runnable(command: Command) -> str:
    """The text to give bash, or a pytest skip with the reason."""
    if command.needs:
        pytest.skip(f"needs: {command.needs} ({command.where})")
    text = command.text.removeprefix(f"{SETUP} && ")  # the environment is the one setup.sh made
    words = strip_comment(text).split()
    if words[0] == "pytest" or words[1:3] == ["-m", "pytest"]:
        pytest.skip(f"the check's own runner: `python3 -m pytest -q tests` runs these tests ({command.where})")
    if words[:2] == SETUP.split():
        pytest.skip(f"installs packages: this check runs in the environment it made ({command.where})")
    return text


def run_bash(text: str, cwd: str) -> tuple[int, str]:
    """Exit code and output (stdout and stderr together) of ``bash -c text``; on a timeout the whole process group
    (torchrun's ranks included) is killed."""
    env = dict(os.environ, **{QUICK_ENV: "1"}, PET_STANDALONE="1",
               PYTHONPATH=os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", text], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -1, f"{out}\n(killed after {TIMEOUT_S} s)"
    return proc.returncode, out


@pytest.mark.parametrize("command", COMMANDS, ids=[c.key for c in COMMANDS])
def test_command_runs_as_written(command: Command, workspace: str) -> None:
    code, out = run_bash(runnable(command), workspace)
    assert code == 0, f"{command.where}: `{command.text}` exited with {code}:\n{out[-4000:]}"


def test_readme_deepspeed_command_is_checked() -> None:
    """The README's own commands are found, and run rather than skipped."""
    keys = {c.key: c for c in COMMANDS}
    readme_deepspeed = "torchrun --nproc_per_node 4 examples/train_deepspeed.py --deepspeed_config " \
                       "ds_configs/large_ep_cpu.json"
    for key in (readme_deepspeed, "bash scripts/setup.sh && largeep demo", "largeep plan --compare", "largeep --help"):
        assert key in keys and keys[key].needs is None, key
    assert len(COMMANDS) >= 40


def test_a_command_is_marked_alike_wherever_it_is_shown() -> None:
    for key, places in occurrences().items():
        marked = {c.where: c.needs for c in places}
        assert len({needs is None for needs in marked.values()}) == 1, (key, marked)


def test_extractor_reads_blocks_spans_and_markers() -> None:
    page = "\n".join([
        "Run `largeep demo --steps 2`, see `largeep plan`, or `torchrun ... --device cuda` (needs: GPU).",
        "```bash",
        "largeep simulate --model m \\",
        "    --cluster c          # a comment",
        "largeep bench overlap    # needs: root; slow",
        "# needs: a checkout",
        "cd /path",
        "",
        "largeep plan --compare",
        "```",
        "```python",
        "python not_a_command.py",
        "```",
    ])
    found = [(c.key, c.where, c.needs) for c in markdown_commands(page, "p.md")]
    assert found == [
        ("largeep demo --steps 2", "p.md:1", None),
        ("torchrun ... --device cuda", "p.md:1", "GPU"),
        ("largeep simulate --model m --cluster c", "p.md:3", None),
        ("largeep bench overlap", "p.md:5", "root; slow"),
        ("cd /path", "p.md:7", "a checkout"),
        ("largeep plan --compare", "p.md:9", None),  # the blank line ends the covering marker
    ]
    assert markdown_commands(page, "p.md")[2].text == "largeep simulate --model m \\\n--cluster c          # a comment"


def test_extractor_reads_the_how_to_run_paragraph() -> None:
    source = '"""Title.\n\nHow to run (CPU):\n\n    python x.py --a 1    # note\n    torchrun y.py  # needs: 2 GPUs\n' \
             '\n    not_this --b\n\nProse.\n"""\nimport os\n'
    found = [(c.key, c.where, c.needs) for c in docstring_commands(source, "x.py")]
    assert found == [("python x.py --a 1", "x.py:5", None), ("torchrun y.py", "x.py:6", "2 GPUs")]


def test_docs_quick_caps_the_named_flags_only_when_asked(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(QUICK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert vars(shorten(argparse.Namespace(steps=50, iters=1), steps=2, iters=3)) == {"steps": 50, "iters": 1}
    monkeypatch.setenv(QUICK_ENV, "1")
    assert vars(shorten(argparse.Namespace(steps=50, iters=1), steps=2, iters=3)) == {"steps": 2, "iters": 1}
    assert capsys.readouterr().err == "LARGEEP_DOCS_QUICK=1: --steps 50 -> 2\n"  # said once, what was cut
    monkeypatch.setenv("RANK", "3")  # a launcher's other ranks stay quiet
    shorten(argparse.Namespace(steps=50), steps=2)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(QUICK_ENV, "yes")
    with pytest.raises(ValueError, match="LARGEEP_DOCS_QUICK='yes' must be 0 or 1"):
        shorten(argparse.Namespace(steps=50), steps=2)
