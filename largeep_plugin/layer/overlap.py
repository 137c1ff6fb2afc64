"""Overlap scheduler: dispatch of chunk i+1 and combine of chunk i-1 run while the expert computes chunk i.

Shape legend:
    T  tokens of this rank      K  top_k        H  hidden size       R  ranks in the EP group      C  chunks
    A  kept (token, expert) assignments of this rank, chunk-major       S  stage-1 rows (hierarchical.py)

How it works
------------
The tokens are cut into C contiguous chunks. Everything a chunk needs is planned up front: the permutation is
local, and ONE small count exchange tells every rank the split sizes of every chunk (and every rank's T). Each
chunk is then a *program*: dispatch steps, the expert, combine steps. A step is an ``Exchange`` (an all-to-all
of some named row-aligned tensors, "lanes") or a ``Local`` function (never communicates: the contract of
dispatcher.py). Flat: [Exchange] expert [Exchange]. Hierarchical: [Exchange, Local(gateway expand), Exchange]
expert [Exchange, Local(gateway reduce), Exchange].

The scheduler walks the chunks in a fixed order, the same on every rank (the collectives must match):

    for c in chunks:  finish dispatch(c); advance dispatch(c+1 .. c+d) by one exchange each
                      (hierarchical: advance combine(c-1) to its inter-node exchange)
                      expert(c)
                      start combine(c); advance combine(c-1) by one exchange
    finish all combines

so while the expert computes chunk c, the dispatch of the next chunk(s) and the combine of the previous one(s)
are in flight. On CPU an exchange is a gloo ``async_op`` work handle progressed by gloo's own threads; on an
accelerator it runs on a side stream (``comm.CommStream``) ordered by events, so the host never blocks.

Backward. Autograd would run the reverse all-to-alls one after another, blocking. Instead the whole pipeline is
one autograd Function. Its forward runs each Local step (the expert included) under ``enable_grad`` on detached
inputs and keeps that small graph; its backward runs the *same scheduler* over the reversed programs: a reverse
exchange is the all-to-all with the splits swapped, a Local step's backward is ``torch.autograd.grad`` of its kept
graph (the expert's gives its input and parameter gradients, summed over chunks). So the reverse combine of chunk
i+1 and the reverse dispatch of chunk i-1 are in flight while the expert's backward of chunk i runs. In backward
every floating lane is exchanged (zeros where no gradient reached it), so the collectives match on all ranks.

Side job. Local work that needs no communication and does not depend on the experts (the shared expert on the
rank's own tokens) can ride along: ``run_pipeline(..., side=SideJob(fn, x, params))`` runs it right after the first
exchange of chunk 0 is started, so it overlaps the first dispatch, and its backward right after the first reverse
exchange is started. It is part of the one autograd node (a second output), differentiated like the expert.

Chunk count. Every rank runs the same number of chunks (collectives must match), min(overlap_chunks, the largest
T in the EP group), learnt from the count exchange: asking for more chunks than tokens is clamped, never an error
(a decode step with 1 token works with any setting). A rank with fewer tokens than chunks has one token per
chunk, then empty chunks (it still takes part in their collectives).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .comm import CommStream, ProcessGroup, start_all_to_all_lanes


# ---- programs -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Exchange:
    """An all-to-all of ``lanes`` (row-aligned 2-D tensors), as seen from this rank, over ``group`` (None: the
    pipeline's group; the node-batched stages may run on a node or rail subgroup, splits in its rank order)."""

    lanes: tuple[str, ...]
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    group: ProcessGroup | None = None

    def reverse(self, lanes: tuple[str, ...] | None = None) -> "Exchange":
        return Exchange(lanes or self.lanes, self.recv_splits, self.send_splits, self.group)


@dataclass(frozen=True)
class Local:
    """Local computation: ``fn(*inputs) -> tuple of outputs``. Must not communicate."""

    fn: Callable[..., tuple[torch.Tensor, ...]]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


Step = Exchange | Local


@dataclass(eq=False)
class SideJob:
    """Local work with no communication, run while a token all-to-all is in flight (the shared expert).

    Attributes:
        fn: ``fn(input) -> output``; must not communicate.
        input: its input (e.g. x_TH).
        params: the parameters ``fn`` uses (the overlap pipeline differentiates w.r.t. them itself).
        output: set by whoever runs the job (``run``, or the pipeline), differentiable w.r.t. input and params.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    input: torch.Tensor
    params: tuple[torch.Tensor, ...] = ()
    output: torch.Tensor | None = None

    def run(self) -> None:
        """Run under the caller's autograd mode (the plain dispatchers' ``during`` hook)."""
        self.output = self.fn(self.input)


@dataclass(frozen=True)
class ChunkProgram:
    """One chunk: rows ``start:stop`` of every input lane, then dispatch steps, the expert on lane "rows"
    (called ``expert(rows, *expert_args)``: colocated experts get the chunk's [R][L] received rows per slot),
    combine steps; the result is lane "rows"."""

    start: int
    stop: int
    dispatch: tuple[Step, ...]
    combine: tuple[Step, ...]
    expert_args: tuple[object, ...] = ()


def chunk_of_tokens(num_tokens: int, num_chunks: int, device: torch.device | None = None) -> torch.Tensor:
    """int64 [T]: chunk of each token; C contiguous chunks, sizes differing by at most one, larger first
    (``torch.tensor_split`` sizes); with T < C, one token per chunk then empty chunks."""
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"overlap_chunks={num_chunks!r} must be an integer >= 1")
    # Arithmetic on the token index, on the device: the first r = T % C chunks hold q + 1 tokens, the rest q.
    q, r = divmod(num_tokens, num_chunks)
    t_T = torch.arange(num_tokens, device=device)
    if q == 0:
        return t_T
    big = r * (q + 1)
    return torch.where(t_T < big, t_T // (q + 1), r + (t_T - big) // q)


def effective_chunks(num_chunks: int, tokens_R: Sequence[int]) -> int:
    """The chunks every rank runs: min(C, largest T), at least 1 (chunks past every rank's T are empty)."""
    return max(1, min(num_chunks, max(tokens_R)))


# ---- the engine -------------------------------------------------------------------------------------------------
class _Chunk:
    """Lanes of one chunk in flight, and what its backward needs (kept graphs, exchanged lane metadata)."""

    def __init__(self) -> None:
        self.lanes: dict[str, torch.Tensor] = {}
        self.tape: dict[tuple[object, ...], object] = {}  # kept graphs, lane flags, exchanged shapes


class _Driver:
    """Steps a chunk's generator: each ``step`` waits for the exchange in flight (if any), runs the local work
    after it and starts the next exchange."""

    def __init__(self, gen: Iterator[None]):
        self.gen, self.done = gen, False

    def step(self) -> None:
        if not self.done:
            try:
                next(self.gen)
            except StopIteration:
                self.done = True

    def finish(self) -> None:
        while not self.done:
            self.step()


def _schedule(n: int, dispatch: Callable[[int], Iterator[None]], compute: Callable[[int], None],
              combine: Callable[[int], Iterator[None]], ahead_d: int, ahead_c: int,
              side: Callable[[], None] | None = None) -> None:
    """The fixed, rank-independent order of the pipeline (see the module docstring); ``side`` runs once, while
    the first exchange of chunk 0 is in flight."""
    disp: dict[int, _Driver] = {}
    comb: dict[int, _Driver] = {}

    def get(drivers: dict[int, _Driver], make: Callable[[int], Iterator[None]], c: int) -> _Driver:
        if c not in drivers:
            drivers[c] = _Driver(make(c))
        return drivers[c]

    for c in range(n):
        if c == 0 and side is not None:
            get(disp, dispatch, 0).step()  # starts chunk 0's first exchange
            side()
        get(disp, dispatch, c).finish()
        del disp[c]
        for j in range(1, ahead_d + 1):
            if c + j < n:
                get(disp, dispatch, c + j).step()
        # A combine of several exchanges (hierarchical: intra-node, then inter-node) takes its next step before
        # the expert, so that its slow inter-node exchange is the one in flight while the expert runs.
        for j in range(1, ahead_c):
            if c - j >= 0:
                comb[c - j].step()
        compute(c)
        get(comb, combine, c).step()
        if c >= 1:
            comb[c - 1].step()
    for c in range(n):
        comb[c].finish()


class _PipelineRun:
    """One call of the pipeline: forward, and (once) its backward."""

    def __init__(self, programs: list[ChunkProgram], input_names: tuple[str, ...], expert: nn.Module,
                 group: ProcessGroup | None, device: torch.device, side: SideJob | None = None):
        self.programs = programs
        self.input_names = input_names
        self.expert = expert
        self.params = [p for p in expert.parameters() if p.requires_grad]
        # The node's inputs for them: the tensors themselves, or, for a stand-in (a detached leaf the expert computes
        # with, ``expert.outer_of``), the tensor outside it stands for. A chunk's backward differentiates the
        # stand-in; the sum over chunks then reaches the outer tensor's own autograd node once (the clones' weights,
        # clones.py), never from inside a chunk.
        outer_of = getattr(expert, "outer_of", {})
        self.param_inputs = [outer_of.get(id(p), p) for p in self.params]
        self.side = side
        self.side_params = [p for p in side.params if p.requires_grad] if side is not None else []
        self.side_tape: tuple[torch.Tensor, torch.Tensor] | None = None  # (input leaf, output) of the side job
        self.side_out: torch.Tensor | None = None
        self.side_grads: list[torch.Tensor | None] = []
        self.group = group
        self.stream = None if device.type == "cpu" else CommStream(device)
        self.chunks = [_Chunk() for _ in programs]
        self.record = False
        self.out_bounds: list[tuple[int, int]] = []
        self.input_meta: list[tuple[torch.Size, torch.dtype, bool]] = []

    # forward -----------------------------------------------------------------------------------------------------
    def forward(self, inputs: Sequence[torch.Tensor], needs: Sequence[bool], record: bool) -> torch.Tensor:
        self.record = record
        self.input_meta = [(t.shape, t.dtype, nd) for t, nd in zip(inputs, needs)]
        for prog, ch in zip(self.programs, self.chunks):
            for name, t, nd in zip(self.input_names, inputs, needs):
                ch.lanes[name] = t.detach()[prog.start:prog.stop]
                ch.tape[("needs", name)] = nd

        def compute(c: int) -> None:
            args = self.programs[c].expert_args
            self._local(self.chunks[c], ("expert", 0), lambda rows: (self.expert(rows, *args),), ("rows",), ("rows",))

        _schedule(len(self.programs),
                  lambda c: self._forward_steps(c, "dispatch", self.programs[c].dispatch), compute,
                  lambda c: self._forward_steps(c, "combine", self.programs[c].combine),
                  _exchanges(self.programs[0].dispatch), _exchanges(self.programs[0].combine),
                  None if self.side is None else self._side_forward)
        outs = [ch.lanes.pop("rows") for ch in self.chunks]
        start = 0
        for o in outs:
            self.out_bounds.append((start, start + o.shape[0]))
            start += o.shape[0]
        if not record:
            self.chunks = []
        return torch.cat(outs)

    def _side_forward(self) -> None:
        side = self.side
        assert side is not None
        if not self.record:
            with torch.no_grad():
                self.side_out = side.fn(side.input)
            return
        leaf = side.input.detach().requires_grad_(side.input.requires_grad)
        with torch.enable_grad():
            out = side.fn(leaf)
        self.side_tape = (leaf, out)
        self.side_out = out.detach()

    def _side_backward(self, grad_side: torch.Tensor) -> None:
        leaf, out = self.side_tape  # type: ignore[misc]
        self.side_tape = None
        wanted = ([leaf] if leaf.requires_grad else []) + self.side_params
        if not out.requires_grad or not wanted:
            self.side_grads = [None] * (1 + len(self.side_params))
            return
        got = list(torch.autograd.grad(out, wanted, grad_side, allow_unused=True))
        self.side_grads = ([got.pop(0)] if leaf.requires_grad else [None]) + got

    def _forward_steps(self, c: int, phase: str, steps: tuple[Step, ...]) -> Iterator[None]:
        ch = self.chunks[c]
        for i, step in enumerate(steps):
            if isinstance(step, Exchange):
                pending = start_all_to_all_lanes([ch.lanes[n] for n in step.lanes], step.recv_splits,
                                                 step.send_splits, self._group_of(step), self.stream)
                yield
                for name, t in zip(step.lanes, pending.wait()):
                    ch.lanes[name] = t
                    ch.tape[("shape", phase, i, name)] = (t.shape, t.dtype)
            else:
                self._local(ch, (phase, i), step.fn, step.inputs, step.outputs)

    def _local(self, ch: _Chunk, key: tuple[str, int], fn: Callable[..., tuple[torch.Tensor, ...]],
               inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        if not self.record:
            with torch.no_grad():
                outs = fn(*(ch.lanes[n] for n in inputs))
            ch.lanes.update(zip(outputs, outs))
            return
        leaves = [ch.lanes[n].detach().requires_grad_(bool(ch.tape.get(("needs", n)))) for n in inputs]
        with torch.enable_grad():
            outs = fn(*leaves)
        ch.tape[key] = (leaves, outs)
        for name, o in zip(outputs, outs):
            ch.lanes[name] = o.detach()
            ch.tape[("needs", name)] = o.requires_grad

    # backward ----------------------------------------------------------------------------------------------------
    def backward(self, grad_out: torch.Tensor, grad_side: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        grads = [{"rows": grad_out[a:b]} for a, b in self.out_bounds]
        side = None
        if self.side is not None:
            side = lambda: self._side_backward(grad_side if grad_side is not None else torch.zeros_like(self.side_out))
        param_grads: list[torch.Tensor | None] = [None] * len(self.params)

        def compute(c: int) -> None:
            ch = self.chunks[c]
            got = self._local_backward(ch, ("expert", 0), ("rows",), ("rows",), grads[c], with_params=True)
            for i, g in enumerate(got):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g

        _schedule(len(self.programs),
                  lambda c: self._backward_steps(c, "combine", self.programs[c].combine, grads[c]), compute,
                  lambda c: self._backward_steps(c, "dispatch", self.programs[c].dispatch, grads[c]),
                  _exchanges(self.programs[0].combine), _exchanges(self.programs[0].dispatch), side)
        out: list[torch.Tensor | None] = []
        for name, (shape, dtype, needs) in zip(self.input_names, self.input_meta):
            if not needs:
                out.append(None)
                continue
            full = torch.zeros(shape, dtype=dtype, device=grad_out.device)
            for prog, g in zip(self.programs, grads):
                if g.get(name) is not None:
                    full[prog.start:prog.stop] = g[name]
            out.append(full)
        self.chunks = []
        return out + param_grads + self.side_grads

    def _backward_steps(self, c: int, phase: str, steps: tuple[Step, ...], grads: dict[str, torch.Tensor]) -> Iterator[None]:
        ch = self.chunks[c]
        for i in reversed(range(len(steps))):
            step = steps[i]
            if isinstance(step, Local):
                self._local_backward(ch, (phase, i), step.inputs, step.outputs, grads)
                continue
            # Every floating lane goes back, zeros where no gradient arrived: the same collectives on all ranks.
            names, sends = [], []
            for name in step.lanes:
                shape, dtype = ch.tape.pop(("shape", phase, i, name))
                if dtype.is_floating_point:
                    names.append(name)
                    g = grads.pop(name, None)
                    sends.append(g if g is not None else torch.zeros(shape, dtype=dtype, device=self._device()))
            if not names:
                continue
            pending = start_all_to_all_lanes(sends, step.send_splits, step.recv_splits, self._group_of(step), self.stream)
            yield
            grads.update(zip(names, pending.wait()))

    def _local_backward(self, ch: _Chunk, key: tuple[str, int], inputs: tuple[str, ...], outputs: tuple[str, ...],
                        grads: dict[str, torch.Tensor], with_params: bool = False) -> list[torch.Tensor | None]:
        leaves, outs = ch.tape.pop(key)  # type: ignore[misc]
        pairs = [(o, grads[n]) for n, o in zip(outputs, outs) if o.requires_grad and grads.get(n) is not None]
        for n in outputs:
            grads.pop(n, None)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        params = self.params if with_params else []
        if not pairs or not (wanted or params):
            return [None] * len(params)
        got = torch.autograd.grad([o for o, _ in pairs], wanted + params, [g for _, g in pairs], allow_unused=True)
        it = iter(got[: len(wanted)])
        for n, leaf in zip(inputs, leaves):
            if leaf.requires_grad:
                g = next(it)
                if g is not None:
                    grads[n] = g
        return list(got[len(wanted):])

    def _group_of(self, step: Exchange) -> ProcessGroup | None:
        return step.group if step.group is not None else self.group

    def _device(self) -> torch.device:
        return self.stream.device if self.stream is not None else torch.device("cpu")


def _exchanges(steps: tuple[Step, ...]) -> int:
    return max(1, sum(isinstance(s, Exchange) for s in steps))


class _PipelineFunction(torch.autograd.Function):
    """The pipeline as one autograd node: inputs (lanes..., expert params..., [side input, side params...]) -> the
    combined rows [and the side job's output]."""

    @staticmethod
    def forward(ctx, run: _PipelineRun, num_inputs: int, *tensors: torch.Tensor):  # type: ignore[override]
        needs = [bool(n) for n in ctx.needs_input_grad[2:2 + num_inputs]]
        ctx.run = run
        rows = run.forward(tensors[:num_inputs], needs, record=True)
        return rows if run.side is None else (rows, run.side_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor, grad_side: torch.Tensor | None = None):  # type: ignore[override]
        run: _PipelineRun = ctx.run
        ctx.run = None
        return (None, None, *run.backward(grad_out.contiguous(), grad_side))


def run_pipeline(programs: list[ChunkProgram], inputs: dict[str, torch.Tensor], expert: nn.Module,
                 group: ProcessGroup | None, side: SideJob | None = None) -> torch.Tensor:
    """Run chunk programs through the overlap scheduler, differentiably (see the module docstring).

    Args:
        programs: one per chunk, with identical step structure on every rank.
        inputs: the input lanes, all chunks' rows one after the other.
        expert: applied to lane "rows" of each chunk between dispatch and combine.
        side: a job to run while chunk 0's first exchange is in flight; its ``output`` is set (differentiable).
    Returns:
        lane "rows" of every chunk after its combine, concatenated.
    """
    names = tuple(inputs)
    tensors = [inputs[n] for n in names]
    device = tensors[0].device
    run = _PipelineRun(programs, names, expert, group, device, side)
    side_tensors = [] if side is None else [side.input, *run.side_params]
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in tensors + side_tensors) or bool(run.params) or bool(run.side_params))
    if not needs_grad:
        rows = run.forward(tensors, [False] * len(tensors), record=False)
        if side is not None:
            side.output = run.side_out
        return rows
    out = _PipelineFunction.apply(run, len(tensors), *tensors, *run.param_inputs, *side_tensors)
    if side is None:
        return out
    rows, side.output = out
    return rows
