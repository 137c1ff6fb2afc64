"""Resume at another EP size: ``save_training_state`` / ``load_training_state`` (``layer/training_state.py``) on
the core layer and on a Hugging Face model trained with plain PyTorch (the torchrun route).

The oracle is the run that never stopped: six Adam steps straight at EP 4 (EP 8 for the colocated case) on a
fixed global batch split over the ranks, against three steps, a save, a model built anew at another EP size
(another world), a load, and three more steps:
    * EP 4 -> 2 (two experts per rank), 4 -> 8 (every expert twice: replicas), 8 -> 6 (8 experts on 6 ranks:
      colocated, two ranks with two), 4 -> EP 2 x 2 data-parallel copies, and 4 -> 4 (bit for bit); with and
      without dynamic replicas (clones are planned afresh at another size), after a move after step 2 (the moved
      layout is restored at the same size and read by expert id at another; the run that never stopped moves
      too): the losses of steps 4-6, the final parameters, Adam's moments of every expert (by id) and of the
      dense parameters, and the bias equal the run that never stopped (1e-6 relative; 0 at the same size);
    * replica-aware files: one file per logical expert, whatever the ranks and copies holding it;
    * atomic writes: a rank killed in the middle of a save leaves the previous checkpoint loadable, and a save
      killed between its two renames is found under ``<path>.old``;
    * refusals: no checkpoint, another expert count, a missing expert file, another optimizer group;
    * a lost node (the local launcher: the two ranks of emulated node 1 kill themselves at step 5 of ten; a
      checkpoint every second step): the survivors relaunch as a world of 2 with a placement planned for them,
      load step 4 and train steps 4-9; the losses before the loss and after the relaunch continue the curve of the
      run that never stopped (same global batches; 1e-6), the step since the checkpoint is done again.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from conftest import make_config, world
from largeep_plugin.tools.launch import WorldError

TOKENS = 48          # global tokens per step (divisible by 2, 4, 6 and 8)
STEPS = 6


# ---- the core layer ------------------------------------------------------------------------------------------------

class _Net(torch.nn.Module):
    """A dense projection, then a large-EP layer."""

    def __init__(self, num_experts: int, ep_size: int, **fields):  # type: ignore[no-untyped-def]
        import largeep_plugin as lep
        from largeep_plugin.placement.plan import plan_placement
        from largeep_plugin.placement.topology import Topology

        super().__init__()
        torch.manual_seed(0)
        cfg = make_config(num_experts, top_k=2, bias_update_rate=1e-2, **fields)
        self.inp = torch.nn.Linear(cfg.hidden_size, cfg.hidden_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the colocation warning
            placement = None if num_experts == ep_size else plan_placement(
                num_experts, Topology.uniform(1, ep_size), allow_colocate=True)
            self.moe = lep.LargeEPMoE(cfg, ep_group=_ep_group(ep_size), placement=placement)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(torch.tanh(self.inp(x)))


def _ep_group(ep_size: int):  # type: ignore[no-untyped-def]
    import largeep_plugin.hf as lhf

    return lhf.parallel_groups(ep_size).ep_group


def _dp_group(ep_size: int):  # type: ignore[no-untyped-def]
    import largeep_plugin.hf as lhf

    return lhf.parallel_groups(ep_size).dp_group


def _steps(net, opt, rank: int, ws: int, ep_size: int, steps: range, dp_group=None) -> list[float]:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    import largeep_plugin as lep

    out = []
    for step in steps:
        x = torch.randn(TOKENS, net.moe.config.hidden_size, generator=torch.Generator().manual_seed(1000 + step))
        part = x.chunk(ws)[rank]
        loss = (net(part) * torch.cos(part)).sum()
        loss.backward()
        lep.allreduce_gradients(net, average=False)
        opt.step()
        if step % 2:   # every other step: the save after step 3 holds counts since the last bias update
            lep.update_expert_biases(net, dp_group)
        lep.rebalance(net, opt)
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        out.append(float(total))
    return out


def _logical(net, opt, plan: bool = True) -> dict[str, tuple[torch.Tensor, ...]]:  # type: ignore[no-untyped-def]
    """Every tensor by logical name: (value, exp_avg, exp_avg_sq) of experts by id and of dense parameters; with
    dynamic replicas the clones' step count and load average, and with ``plan`` their plan (a plan is for one
    layout: only comparable at the same EP size)."""
    out = {}
    clones = net.moe.clones
    if clones is not None:
        out["clones.steps"] = (torch.tensor([float(clones.steps)]),)
        out["clones.load_ema_E"] = (clones.load_ema_E.clone(),)
        if plan:
            out["clones.plan"] = (clones.plan_clones_RS.double() + 2.0, clones.plan_load_E.clone())
    for e, module in net.moe.local_experts():
        for n, p in module.named_parameters():
            s = opt.state[p]
            out[f"expert{e}.{n}"] = (p.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone())
    for n, p in net.named_parameters():
        if getattr(p, "allreduce", True):
            s = opt.state[p]
            out[n] = (p.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone())
    out["bias"] = (net.moe.router.expert_bias.clone(),)
    return out


def _train(net, opt, rank: int, ws: int, steps: range, move: bool) -> list[float]:  # type: ignore[no-untyped-def]
    """``steps`` of ``_steps``; with ``move``, every expert goes to the mirrored rank after step 2 (the layout a
    planner might have chosen)."""
    import largeep_plugin as lep

    out = []
    for step in steps:
        out += _steps(net, opt, rank, ws, ws, range(step, step + 1))
        if move and step == 1:
            home = net.moe.home_layout()
            lep.move_experts(net.moe, tuple(home[ws - 1 - r] for r in range(ws)), opt)
    return out


def _straight(rank: int, ws: int, experts: int, fields: dict, move: bool) -> tuple[list[float], dict]:
    net = _Net(experts, ws, **fields)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    return _train(net, opt, rank, ws, range(STEPS), move), _logical(net, opt)


def _before(rank: int, ws: int, experts: int, fields: dict, path: str, move: bool) -> tuple[list[float], dict]:
    """The run that never stops (returned), then a new run's first half and its save."""
    import largeep_plugin as lep

    straight = _straight(rank, ws, experts, fields, move)
    net = _Net(experts, ws, **fields)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _train(net, opt, rank, ws, range(STEPS // 2), move)
    lep.save_training_state(path, net, opt, extra={"step": STEPS // 2})
    return straight


def _second_half(rank: int, ws: int, experts: int, fields: dict, path: str, ep_size: int) -> tuple[list[float], dict]:
    import largeep_plugin as lep

    net = _Net(experts, ep_size, **fields)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    extra = lep.load_training_state(path, net, opt)
    assert extra == {"step": STEPS // 2}, extra
    dp_group = _dp_group(ep_size)
    losses = _steps(net, opt, rank, ws, ep_size, range(STEPS // 2, STEPS), dp_group)
    return losses, _logical(net, opt, plan=(ep_size, ws) == (net.moe.config.num_experts, net.moe.config.num_experts))


def _worst(reference: list, resumed: list) -> dict[str, float]:
    got = {k: v for _, part in resumed for k, v in part.items()}
    want = {k: v for _, part in reference for k, v in part.items() if k in got or k != "clones.plan"}
    assert sorted(want) == sorted(got), sorted(set(want) ^ set(got))
    losses = reference[0][0][STEPS // 2:], resumed[0][0]
    worst = {"loss": max(abs(a - b) / abs(a) for a, b in zip(*losses))}
    for i, what in enumerate(("param", "exp_avg", "exp_avg_sq")):
        worst[what] = max(float((want[k][i] - got[k][i]).abs().max() / want[k][i].abs().max().clamp_min(1e-30))
                          for k in want if len(want[k]) > i)
    return worst


# (experts, saved at EP, resumed at EP, world of the resume)
ALL = [(4, 4, 2, 2), (4, 4, 8, 8), (8, 8, 6, 6), (4, 4, 2, 4), (4, 4, 4, 4)]
SOME = [(4, 4, 2, 2), (8, 8, 6, 6), (4, 4, 4, 4)]
SAME_AND_ONE = [(4, 4, 2, 2), (4, 4, 4, 4)]


# Clones re-planned every second step: a resume that lost the clones' step count would re-plan at other steps.
CLONES = {"dynamic_replicas": 1, "rebalance_every": 2}


@pytest.mark.parametrize("fields,move,resumes", [({}, False, ALL), (CLONES, False, SOME),
                                                  ({}, True, SAME_AND_ONE), (CLONES, True, SAME_AND_ONE)],
                         ids=["homes", "clones", "moved", "moved-clones"])
def test_resume_at_another_ep_size_equals_the_run_that_never_stopped(tmp_path, fields: dict, move: bool,  # type: ignore[no-untyped-def]
                                                                    resumes: list) -> None:
    for experts, saved, resumed, ws in resumes:
        path = str(tmp_path / f"ckpt_{experts}_{saved}_{resumed}_{ws}")
        reference = world(_before, saved, experts, fields, path, move, timeout=300)
        files = sorted(os.listdir(os.path.join(path, "experts")))
        assert files == sorted(f"moe.experts.{e}.pt" for e in range(experts)), files
        worst = _worst(reference, world(_second_half, ws, experts, fields, path, resumed, timeout=300))
        tol = 0.0 if (saved, resumed, ws) == (4, 4, 4) else 1e-6
        assert all(v <= tol for v in worst.values()), f"{experts} experts, EP {saved} -> {resumed} (world {ws}): {worst}"


# ---- atomic writes -----------------------------------------------------------------------------------------------

class _DiesWhileReading:
    """A ``StateAccess`` that kills its process at the ``after``-th read on rank ``victim`` (a save in progress)."""

    def __init__(self, optimizer, victim: int, after: int):  # type: ignore[no-untyped-def]
        from largeep_plugin.layer.expert_state import TorchOptimizerState

        self.inner, self.victim, self.left = TorchOptimizerState(optimizer), victim, after
        self.optimizer = optimizer

    def read(self, param, *, grad):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        self.left -= 1
        if dist.get_rank() == self.victim and self.left < 0:
            os.kill(os.getpid(), 9)
        return self.inner.read(param, grad=grad)

    def write(self, param, state):  # type: ignore[no-untyped-def]
        self.inner.write(param, state)


def _killed_save(rank: int, ws: int, path: str, expected: str) -> None:
    import largeep_plugin as lep

    net = _Net(4, ws)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _steps(net, opt, rank, ws, ws, range(2))
    lep.save_training_state(path, net, opt, extra={"step": 2})
    torch.save(_logical(net, opt), f"{expected}.{rank}")
    _steps(net, opt, rank, ws, ws, range(2, 3))
    lep.save_training_state(path, net, _DiesWhileReading(opt, victim=1, after=3), extra={"step": 3})


def _load_logical(rank: int, ws: int, path: str) -> tuple[dict, object]:
    import largeep_plugin as lep

    net = _Net(4, ws)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    extra = lep.load_training_state(path, net, opt)
    return _logical(net, opt), extra


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, expected = str(tmp_path / "ckpt"), str(tmp_path / "expected")
    with pytest.raises(WorldError):
        world(_killed_save, 4, path, expected, timeout=120)
    assert os.path.exists(path + ".partial")   # the killed save's files, never published
    got = world(_load_logical, 4, path)
    for rank, (state, extra) in enumerate(got):
        assert extra == {"step": 2}
        want = torch.load(f"{expected}.{rank}", weights_only=False)
        assert sorted(want) == sorted(state)
        assert all(torch.equal(a, b) for k in want for a, b in zip(want[k], state[k])), rank


def test_a_kill_between_the_renames_is_found_under_old(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import largeep_plugin as lep
    from largeep_plugin.layer.training_state import checkpoint_dir

    net = _Net(4, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    path = str(tmp_path / "ckpt")
    lep.save_training_state(path, net, opt, extra={"step": 1})
    os.replace(path, path + ".old")           # what a kill after the first rename leaves
    os.makedirs(path + ".partial")
    assert checkpoint_dir(path) == path + ".old"
    assert lep.load_training_state(path, _Net(4, 1), None) == {"step": 1}
    lep.save_training_state(path, net, opt, extra={"step": 2})   # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and checkpoint_dir(path) == path


def test_refusals(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import largeep_plugin as lep

    with pytest.raises(ValueError, match="holds no training state"):
        lep.load_training_state(str(tmp_path / "none"), _Net(4, 1))
    net = _Net(4, 1)
    opt = torch.optim.Adam([{"params": [net.inp.weight]}, {"params": [p for n, p in net.named_parameters()
                                                                        if n != "inp.weight"]}])
    path = str(tmp_path / "ckpt")
    lep.save_training_state(path, net, opt)
    with pytest.raises(ValueError, match="has num_experts=8, the checkpoint 4"):
        lep.load_training_state(path, _Net(8, 1))
    swapped = _Net(4, 1)
    opt2 = torch.optim.Adam([{"params": [p for n, p in swapped.named_parameters() if n != "inp.weight"]},
                             {"params": [swapped.inp.weight]}])
    with pytest.raises(ValueError, match="inp.weight is in optimizer group 1, but was saved in group 0"):
        lep.load_training_state(path, swapped, opt2)
    os.remove(os.path.join(path, "experts", "moe.experts.2.pt"))
    with pytest.raises(ValueError, match=r"has no expert 2 of layer 'moe' \(file experts/moe.experts.2.pt\)"):
        lep.load_training_state(path, _Net(4, 1))


# ---- a lost node ---------------------------------------------------------------------------------------------------
# Two emulated nodes of two ranks (the local launcher: the ranks of node 1 kill themselves, SIGKILL, as a lost
# machine would vanish); a checkpoint every second step; the survivors relaunch as a world of 2 with a placement
# planned anew for one node of 2 ranks (two experts per rank) and go on from the last checkpoint.
DRILL_STEPS, SAVE_EVERY, DIES_AT = 10, 2, 5


def _drill_first_run(rank: int, ws: int, path: str, log: str) -> None:
    import time

    import largeep_plugin as lep

    net = _Net(4, ws)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(DRILL_STEPS):
        if step == DIES_AT and rank >= ws // 2:   # node 1 is lost at the start of this step
            with open(f"{log}.killed", "w", encoding="utf-8") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), 9)
        loss = _steps(net, opt, rank, ws, ws, range(step, step + 1))[0]
        if rank == 0:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{step} {loss!r}\n")
        if (step + 1) % SAVE_EVERY == 0:
            lep.save_training_state(path, net, opt, extra={"step": step + 1})


def _drill_survivors(rank: int, ws: int, path: str) -> dict:
    import time

    import largeep_plugin as lep

    started = time.time()
    net = _Net(4, ws)   # 4 experts on 2 ranks: a placement planned for the survivors
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    extra = lep.load_training_state(path, net, opt)
    loaded = time.time()
    losses = _steps(net, opt, rank, ws, ws, range(extra["step"], DRILL_STEPS), _dp_group(ws))
    return {"from": extra["step"], "losses": losses, "home": net.moe.home_layout(), "started": started,
            "loaded": loaded, "done": time.time()}


def _drill_straight(rank: int, ws: int) -> list[float]:
    net = _Net(4, ws)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    return _steps(net, opt, rank, ws, ws, range(DRILL_STEPS))


def test_a_lost_node_resumes_on_the_survivors_and_the_curve_goes_on(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import time

    path, log = str(tmp_path / "ckpt"), str(tmp_path / "losses")
    straight = world(_drill_straight, 4)[0]
    with pytest.raises(WorldError):
        world(_drill_first_run, 4, path, log, timeout=300)
    lost = time.time()
    with open(f"{log}.killed", encoding="utf-8") as f:
        killed = float(f.read())
    with open(log, encoding="utf-8") as f:
        before = [float(line.split()[1]) for line in f]
    survivors = world(_drill_survivors, 2, path, timeout=300)[0]
    assert before == straight[:DIES_AT]     # the run until the loss: the same steps as the run that never stopped
    assert survivors["from"] == DIES_AT - DIES_AT % SAVE_EVERY   # the last checkpoint: the step since it is lost
    assert sorted(len(h) for h in survivors["home"]) == [2, 2]   # every expert on the two survivors
    assert sorted(x for h in survivors["home"] for x in h) == [0, 1, 2, 3]
    worst = max(abs(a - b) / abs(a) for a, b in zip(straight[survivors["from"]:], survivors["losses"]))
    assert worst <= 1e-6, (straight, survivors["losses"])
    print(f"\nlost-node drill: node 1 killed at step {DIES_AT}; the world failed {lost - killed:.2f} s later; the "
          f"survivors started {survivors['started'] - lost:.2f} s after that, loaded step {survivors['from']} in "
          f"{survivors['loaded'] - survivors['started']:.2f} s, and ran steps {survivors['from']}-{DRILL_STEPS - 1} "
          f"in {survivors['done'] - survivors['loaded']:.2f} s; largest loss difference to the run that never "
          f"stopped {worst:.1e}")
