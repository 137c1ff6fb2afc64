"""``largeep bench hf`` at 2 ranks with a tiny Mixtral: every variant trains the same model the same way (equal
losses at the first and the last step, replicas and dynamic replicas included: their gradients are summed into
their homes), the skewed router is measurably skewed and the replicas go to the hot expert; the critical-path
columns are consistent (the force-balanced figure is large-EP's with its compute spread evenly, so never slower);
DeepSpeed's AutoEP runs in scripts/setup.sh's AutoEP environment when this one's transformers is too new for it;
the replica planner on its own; the learned router is the same in every process; bad flags are clear errors
before any rank starts. Speeds are not asserted: the benchmark measures them."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from largeep_plugin.cli import main  # noqa: E402
from largeep_plugin.commands.bench_hf import autoep_python  # noqa: E402
from largeep_plugin.integrations.hf.bench_variants import VARIANTS, autoep_unavailable, replica_placement  # noqa: E402
from largeep_plugin.integrations.hf.tiny_models import ModelSizes, bench_model, hot_experts  # noqa: E402

TINY = ["--hidden-size", "32", "--ffn-hidden-size", "64", "--num-layers", "1", "--batch-size", "4", "--seq-len", "16",
        "--iters", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench_hf")
    # E = 2 experts: top-1 leaves room for imbalance; one extra slot gives the hot expert a second copy. A learning
    # rate large enough that the 4 steps move the losses apart where a variant trains differently.
    assert main(["bench", "hf", "--family", "mixtral", "--ep", "2", "--top-k", "1", "--replica-slots", "1", *TINY,
                 "--router", "uniform,skewed", "--variants", ",".join(VARIANTS), "--lr", "2e-3",
                 "--out", str(out)]) == 0
    data = json.loads((out / "hf_bench.json").read_text())
    data["png"] = (out / "hf_bench.png").read_bytes()[:8]
    return data


def test_every_variant_on_the_same_model(result: dict) -> None:
    skipped = result["autoep_skipped"]
    if autoep_python() is not None or autoep_unavailable("mixtral") is None:
        assert skipped is None  # AutoEP ran: here, or in the AutoEP environment the command ran itself in
    want = [v for v in VARIANTS if v != "autoep" or skipped is None] + ["force_balanced"]
    assert [(r["router"], r["variant"]) for r in result["rows"]] == [(router, v) for router in ("uniform", "skewed")
                                                                     for v in want]
    for router in ("uniform", "skewed"):
        rows = [r for r in result["rows"] if r["router"] == router and r["variant"] != "force_balanced"]
        # Same weights, same tokens: the first step's loss is the same for every variant, and so is the last one's
        # (each variant took the same steps): the model trains the same way.
        for key in ("first_loss", "last_loss"):
            losses = [r[key] for r in rows]
            assert max(losses) - min(losses) < 1e-3, (key, losses)
        assert rows[0]["last_loss"] < rows[0]["first_loss"] - 0.1
        for r in rows:
            assert r["tokens_per_s_per_rank"] > 0 and len(r["step_seconds"]) == 2 and r["busiest_cpu_ms"] > 0
            assert r["peak_mib"] is None or r["peak_mib"] > 0
            assert r["vs_unconverted"] == pytest.approx(r["tokens_per_s_per_rank"] / rows[0]["tokens_per_s_per_rank"])
            # The critical path: compute and communication, both measured, the rate its inverse.
            assert r["critical_ms"] >= r["comm_ms"] > 0 and r["critical_ms"] == pytest.approx(
                r["compute_ms"] + r["comm_ms"])
            assert r["critical_tokens_per_s"] == pytest.approx(4 * 16 / (r["critical_ms"] / 1e3))
        balanced = next(r for r in result["rows"] if r["router"] == router and r["variant"] == "force_balanced")
        ours = next(r for r in rows if r["variant"] == "large_ep")
        assert balanced["comm_ms"] == ours["comm_ms"] and balanced["compute_ms"] <= ours["compute_ms"]
        assert balanced["compute_ms"] == ours["balanced_compute_ms"]
        assert all(0 < r["balanced_compute_ms"] <= r["compute_ms"] for r in rows)
        # Two ranks on two nodes: every all-to-all row to the other rank crosses; unconverted sends none.
        assert ours["internode_mb"] > 0 and rows[0]["internode_mb"] == 0
    # Two ranks on two cores: the run measured how much the cores slow each other, and every row of the world says it.
    for w in result["worlds"]:
        sharing = w["core_sharing"]
        assert sharing["rounds"] == 5 and len(sharing["alone_ms"]) == len(sharing["together_ms"]) == 2
        assert min(sharing["alone_ms"] + sharing["together_ms"]) > 0 and sharing["slowdown"] > 0
        assert {r["core_slowdown"] for r in result["rows"] if r["router"] == w["router"]
                and r["variant"] != "force_balanced"} == {sharing["slowdown"]}
    assert result["png"] == b"\x89PNG\r\n\x1a\n"


def test_skewed_router_and_replicas(result: dict) -> None:
    uniform, skewed = result["worlds"]
    assert skewed["router"] == "skewed" and skewed["imbalance"] >= 1.5 > uniform["imbalance"]
    assert hot_experts(2) == [1] and skewed["load"][1] == max(skewed["load"])
    # The planner gave the extra slot to the hot expert, which lowers the planned largest rank load.
    assert skewed["copies"] == [1, 2] and sorted(map(tuple, skewed["replicas"])) == [(0, 1), (1,)]
    replicas = next(r for r in result["rows"] if r["router"] == "skewed" and r["variant"] == "large_ep_replicas")
    assert replicas["rank_imbalance"] < skewed["imbalance"]


def test_replica_placement_follows_the_load() -> None:
    load_E = torch.tensor([20.0, 40.0, 60.0, 80.0, 100.0, 100.0, 700.0, 900.0])
    placement = replica_placement(load_E, 8, 8)
    copies = placement.num_replicas
    assert sum(copies) == 16 and copies[7] >= copies[6] > max(copies[:6])
    assert all(len(held) == 2 for held in placement.rank_to_experts)          # a second slot on every rank
    assert placement.figures(load_E).gpu_imbalance < float(load_E.max() / load_E.mean())
    # Uniform load: two copies of every expert, perfectly balanced.
    even = replica_placement(torch.ones(4), 4, 4)
    assert even.num_replicas == [2, 2, 2, 2] and even.figures(torch.ones(4)).gpu_imbalance == pytest.approx(1.0)
    with pytest.raises(ValueError, match="experts"):
        replica_placement(torch.ones(4), 8, 2)


def test_routers_are_a_pure_function_of_the_seed() -> None:
    sizes = ModelSizes(hidden_size=16, ffn_hidden_size=16, num_layers=1, num_heads=2, vocab_size=32, seq_len=8,
                       batch_size=2, top_k=1)
    a, b = (bench_model("qwen3_moe", 4, sizes, "skewed", seed=5) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    uniform = bench_model("qwen3_moe", 4, sizes, "uniform", seed=5)
    assert not torch.equal(uniform.model.layers[0].mlp.gate.weight, a.model.layers[0].mlp.gate.weight)
    # The learned router: trained, and the same wherever it is trained (one thread, a fixed seed).
    from largeep_plugin.integrations.hf.tiny_models import learned_state

    learned = bench_model("qwen3_moe", 4, sizes, "learned", seed=5, learn_steps=3)
    again = learned_state.__wrapped__("qwen3_moe", 4, sizes, 5, 3)  # computed anew, not from the cache
    assert all(torch.equal(learned.state_dict()[k], v) for k, v in again.items())
    assert not torch.equal(learned.model.layers[0].mlp.gate.weight, uniform.model.layers[0].mlp.gate.weight)


def test_bad_family_and_flags_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "hf", "--family", "llama", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "family='llama'" in err and "mixtral" in err and "gpt_oss" in err
    assert main(["bench", "hf", "--variants", "large_ep,fastest", "--out", "unused"]) == 2
    assert "fastest" in capsys.readouterr().err
    assert main(["bench", "hf", "--variants", "large_ep_replicas", "--out", "unused"]) == 2
    assert "list large_ep too" in capsys.readouterr().err
    assert main(["bench", "hf", "--ep", "2", "--top-k", "3", "--out", "unused"]) == 2
    assert "--top-k 3" in capsys.readouterr().err
    assert main(["bench", "hf", "--hidden-size", "30", "--out", "unused"]) == 2
    assert "hidden_size=30" in capsys.readouterr().err
    assert main(["bench", "hf", "--router", "uniform,zipf", "--out", "unused"]) == 2  # before any rank starts
    assert "--router zipf" in capsys.readouterr().err


def test_autoep_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.22.2")   # whatever is installed: the preset reason
    assert "no preset for gpt_oss" in autoep_unavailable("gpt_oss") and "olmoe" in autoep_unavailable("olmoe")
    monkeypatch.setattr(transformers, "__version__", "5.23.0")
    reason = autoep_unavailable("mixtral")
    assert reason is not None and "transformers 5.23.0" in reason and "5.22.2" in reason


def test_target_lines_say_met_or_not_from_the_rows() -> None:
    from largeep_plugin.commands.bench_hf import target_lines

    def row(ep: int, router: str, variant: str, crit: float, waited: float | None = None,
            imbalance: float = 1.0) -> dict:
        return {"ep": ep, "router": router, "variant": variant, "critical_tokens_per_s": crit,
                "waited_tokens_per_s": waited, "imbalance": imbalance}

    rows = [row(2, "uniform", "autoep", 100.0, 95.0), row(2, "uniform", "large_ep", 99.0, 80.0),
            row(16, "learned", "autoep", 100.0, imbalance=2.5), row(16, "learned", "large_ep_dynamic", 150.0,
                                                                   imbalance=2.5),
            row(16, "learned", "force_balanced", 160.0, imbalance=2.5)]
    lines = target_lines(rows)
    assert "target EP 2 uniform: large_ep >= 1.0x autoep (critical path): 0.99x, NOT met" in lines
    # large_ep's critical path is 99 / 80 - 1 = +23.75 % off its waited wall clock: the worst, beyond 10 %.
    assert any(line.startswith("check EP 2 uniform") and "worst large_ep +23.8 %, NOT met" in line for line in lines)
    assert "target EP 16 learned: large_ep_dynamic >= 1.4x autoep (critical path): 1.50x, met" in lines
    assert "target EP 16 learned: large_ep_dynamic >= 0.90x force_balanced: 0.94x, met" in lines
    # With the waited steps taken apart, the line says where the two sides differ.
    rows[1].update(compute_ms=40.0, comm_ms=10.0, waited_compute_ms=43.0, waited_communication_ms=19.5)
    assert any(line.startswith("check EP 2 uniform") and "worst large_ep +23.8 % (compute 40.0 ms, collectives "
               "10.0 ms; the wall clock's own 43.0 and 19.5), NOT met" in line for line in target_lines(rows))
    rows[1]["waited_tokens_per_s"] = 95.0
    assert any("check EP 2 uniform" in line and ", met" in line for line in target_lines(rows))
    # The machine's own share of a gap, measured in the same run, is printed under the check.
    assert not any("this machine in this run" in line for line in target_lines(rows))
    for r in rows[:2]:  # the world's figure, on each of its rows
        r["core_slowdown"] = 1.084
    lines = target_lines(rows)
    check = next(i for i, line in enumerate(lines) if line.startswith("check EP 2 uniform"))
    assert "GEMMs took +8.4 % on every rank at once" in lines[check + 1]
    rows[1]["critical_tokens_per_s"] = 99.6      # 0.996x would print as 1.00x beside "NOT met"
    assert "target EP 2 uniform: large_ep >= 1.0x autoep (critical path): 0.996x, NOT met" in target_lines(rows)
