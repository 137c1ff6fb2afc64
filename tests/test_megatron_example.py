"""examples/pretrain_gpt_largeep.py on CPU: 20 steps of a 4-layer GPT with 4 large-EP experts on 4 gloo ranks,
loss going down; and the clear refusals of what cannot run on CPU (the stock MoE, tensor parallelism)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e .[megatron])")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "pretrain_gpt_largeep.py")


def run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=400)


def test_example_trains_20_steps_on_cpu_with_loss_going_down(tmp_path: Any) -> None:
    out = tmp_path / "run.json"
    monitor = tmp_path / "load.jsonl"
    proc = run("--steps", "20", "--json-out", str(out), "--monitor", str(monitor))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    losses = result["losses"]
    assert len(losses) == 20 and result["world"] == 4
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not go down: {losses}"
    # Per-expert load of the last step, every layer: all 4 ranks' micro-batch * seq * top-k assignments.
    args = result["args"]
    assert [r["layer"] for r in result["load"]] == ["layer_1", "layer_2", "layer_3", "layer_4"]
    for record in result["load"]:
        assert len(record["counts"]) == 4 and sum(record["counts"]) == 4 * args["micro_batch"] * args["seq"] * 2
    lines = [json.loads(line) for line in monitor.read_text().splitlines()]
    assert len(lines) == 20 * 4 and {r["step"] for r in lines} == set(range(20))
    assert "large-EP: world 4, loss" in proc.stdout


def test_stock_moe_and_tensor_parallelism_are_refused_on_cpu_with_the_reason() -> None:
    proc = run("--no-large-ep")
    assert proc.returncode == 2
    assert "the stock Megatron MoE layer cannot run on CPU" in proc.stderr and "TopKRouter.gating" in proc.stderr
    proc = run("--tp", "2")
    assert proc.returncode == 2 and "--tp > 1 needs --device cuda" in proc.stderr


@pytest.mark.parametrize("model, experts, top_k, moe_layers", [
    ("mixtral-tiny", 4, 2, ["layer_1", "layer_2", "layer_3", "layer_4"]),
    ("qwen3-tiny", 8, 2, ["layer_1", "layer_2", "layer_3", "layer_4"]),
    ("deepseek-v3-tiny", 16, 4, ["layer_2", "layer_3", "layer_4"]),  # the first layer dense, as DeepSeek's
])
def test_model_families_train_20_steps_on_cpu(tmp_path: Any, model: str, experts: int, top_k: int,
                                              moe_layers: list[str]) -> None:
    out = tmp_path / "run.json"
    proc = run("--model", model, "--steps", "20", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    losses = result["losses"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert len(losses) == 20 and last < 0.8 * first, f"loss did not go down: {losses}"
    args = result["args"]
    assert [r["layer"] for r in result["load"]] == moe_layers
    for record in result["load"]:
        assert len(record["counts"]) == experts
        assert sum(record["counts"]) == 4 * args["micro_batch"] * args["seq"] * top_k
