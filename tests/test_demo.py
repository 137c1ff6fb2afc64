"""`largeep demo`: a short run on a small world trains (the loss goes down), writes its files in the documented
formats, and the routing-load files agree with the layers' own global counts."""
from __future__ import annotations

import io
import json

import pytest
import torch

from largeep_plugin.cli import main
from largeep_plugin.tools.load_record import RoutingRecorder
from largeep_plugin.models.synthetic import MarkovChainData
from largeep_plugin.models.tiny_moe import TinyMoEConfig
from largeep_plugin.models.training import TrainSettings
from largeep_plugin.tools.progress import ProgressBar

WORLD, STEPS, LAYERS, BATCH, SEQ, TOP_K = 4, 24, 2, 4, 32, 2


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = [
        "demo", "--world-size", str(WORLD), "--steps", str(STEPS), "--num-layers", str(LAYERS),
        "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--output-dir", str(out / "run"), "--record-load", str(out / "load"), "--no-progress", "--timeout", "300",
        "--no-compare",  # the side-by-side part is tested in test_deepspeed_bench.py
        "--balance-steps", "3", "--balance-tokens", "64",  # part 3's arithmetic: test_balance_bench.py
    ]
    assert main(argv) == 0
    with open(out / "run" / "summary.json") as f:
        summary = json.load(f)
    balance = summary["balance"]
    assert [r["ep"] for r in balance["results"]] == [WORLD] and len(balance["results"][0]["steps"]) == 3
    assert all((out / "run" / name).is_file() for name in ("balance.json", "balance.png"))
    return out, summary["training"]


def test_loss_goes_down(demo_run):
    _, summary = demo_run
    losses = summary["losses"]
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # Starts near a uniform guess and drops clearly (the chain is learnable).
    assert abs(first - summary["uniform_loss"]) < 0.3
    assert last < first - 0.4
    assert summary["tokens_per_s"] > 0


def test_load_files_match_layer_counts(demo_run):
    out, summary = demo_run
    tokens_per_step = WORLD * BATCH * SEQ
    assert summary["tokens_per_step"] == tokens_per_step
    per_layer = []
    for i in range(LAYERS):
        with open(out / "load" / f"load_layer{i}.json") as f:
            load = json.load(f)
        assert list(load) == ["tokens_per_expert"]
        assert len(load["tokens_per_expert"]) == WORLD
        # The recorder re-derives routing in a hook; the layer counts it itself: they must agree exactly.
        assert load["tokens_per_expert"] == summary["load_per_layer"][i]
        assert sum(load["tokens_per_expert"]) == STEPS * tokens_per_step * TOP_K
        per_layer.append(load["tokens_per_expert"])
        with open(out / "load" / f"coactivation_layer{i}.json") as f:
            co = torch.tensor(json.load(f)["coactivation"])
        assert co.shape == (WORLD, WORLD)
        assert torch.equal(co, co.T) and int(co.diagonal().abs().sum()) == 0
        # Each token with two distinct experts adds (a, b) and (b, a).
        assert int(co.sum()) == 2 * STEPS * tokens_per_step
        # Row e sums to the tokens that chose e (each of them has exactly one partner).
        assert co.sum(1).tolist() == load["tokens_per_expert"]
    with open(out / "load" / "load.json") as f:
        assert json.load(f)["tokens_per_expert"] == [sum(c) for c in zip(*per_layer)]
    with open(out / "load" / "coactivation.json") as f:
        assert torch.tensor(json.load(f)["coactivation"]).sum(1).tolist() == [sum(c) for c in zip(*per_layer)]


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--record-load" in capsys.readouterr().out
    # 30 is not a multiple of 4 heads: refused before any rank starts, naming the flags.
    assert main(["demo", "--world-size", "2", "--hidden-size", "30"]) == 2
    assert "--hidden-size=30 must be a multiple of --num-heads=4" in capsys.readouterr().err


def test_recorder_counts_pairs():
    rec = RoutingRecorder(num_experts=4, num_layers=1)
    rec.add(0, torch.tensor([[0, 1], [1, 0], [2, 3], [1, 3]]))
    assert rec.tokens_per_expert_LE[0].tolist() == [2, 3, 1, 2]
    assert rec.coactivation_LEE[0].tolist() == [[0, 2, 0, 0], [2, 0, 0, 1], [0, 0, 0, 1], [0, 1, 1, 0]]
    with pytest.raises(ValueError, match="layer=1"):
        rec.add(1, torch.tensor([[0, 1]]))


def test_markov_data_is_reproducible_and_learnable():
    data = MarkovChainData(16, branching=2, seed=3)
    a, ta = data.batch(2, 10, rank=1, step=5)
    b, _ = data.batch(2, 10, rank=1, step=5)
    c, _ = data.batch(2, 10, rank=2, step=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:], ta[:, :-1])
    # Every transition taken is one the chain allows.
    assert bool((data.transition_VV[a.reshape(-1), ta.reshape(-1)] > 0).all())
    assert data.entropy_floor() < MarkovChainData.uniform_loss(16) - 1.0


def _rank_frequency_slope(freq_V: torch.Tensor, top: int) -> float:
    """Least-squares slope of log frequency against log rank over the ``top`` most frequent tokens."""
    x = torch.arange(1, top + 1, dtype=torch.float64).log()
    y = freq_V.sort(descending=True).values[:top].log()
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_markov_data_token_frequencies_follow_zipf(seed):
    flat, text = MarkovChainData(256, seed=seed), MarkovChainData(256, seed=seed, zipf=1.0)
    assert _rank_frequency_slope(flat.stationary(), 64) > -0.4  # every token about as frequent
    assert -1.2 < _rank_frequency_slope(text.stationary(), 64) < -0.8  # Zipf's law, exponent about 1
    # The sequences the chain draws have those frequencies (not only its stationary law).
    tokens, targets = text.batch(64, 128, rank=0, step=0)
    drawn_V = torch.bincount(tokens.reshape(-1), minlength=256).double()
    assert -1.25 < _rank_frequency_slope(drawn_V / drawn_V.sum(), 32) < -0.75
    assert bool((text.transition_VV[tokens.reshape(-1), targets.reshape(-1)] > 0).all())
    assert torch.allclose(text.transition_VV.sum(1), torch.ones(256, dtype=torch.float64))
    assert text.entropy_floor() < MarkovChainData.uniform_loss(256) - 1.0  # still learnable
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="zipf="):
            MarkovChainData(256, zipf=bad)


def test_progress_bar_on_a_pipe():
    stream = io.StringIO()
    bar = ProgressBar(50, label="train", stream=stream)
    for step in range(1, 51):
        bar.update(step, loss=1.5, tok_s=12345.0)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 11  # about one line per tenth, never one per step
    assert lines[-1].startswith("train [" + "#" * 30 + "] 50/50") and "tok_s 12,345" in lines[-1]


def test_tiny_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        TinyMoEConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="top_k=5"):
        TinyMoEConfig(num_experts=4, top_k=5)


def test_train_settings_refuse_what_every_rank_would():
    # One error in the parent instead of one traceback per rank after the fork.
    with pytest.raises(ValueError, match="bias_update_rate=-1.0 must be a finite number >= 0"):
        TrainSettings(model=TinyMoEConfig(), bias_update_rate=-1.0)
    with pytest.raises(ValueError, match="branching=4 must be <= model.vocab_size=3"):
        TrainSettings(model=TinyMoEConfig(vocab_size=3))
