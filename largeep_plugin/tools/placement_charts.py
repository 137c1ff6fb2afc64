"""PNG charts of placements for ``largeep plan``: GPUs grouped by node and coloured by load, inter-node traffic,
and the benchmark's comparison with the baselines.

matplotlib is imported inside the functions (Agg backend, no display needed), so the core keeps to torch and the
standard library.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from largeep_plugin.placement.plan import Placement
from largeep_plugin.placement.figures import PlacementFigures
from largeep_plugin.tools.pyplot import pyplot


def plot_placement(placement: Placement, figures: Mapping[str, PlacementFigures], path: str | Path, *,
                   title: str = "") -> Path:
    """Write a PNG: the plan's GPUs by node (label: expert ids, colour: tokens per GPU), its inter-node link
    matrix (MB per dispatch), and the largest link time / GPU load of every placement in ``figures`` (which must
    have the key "ours")."""
    plt = pyplot("placement charts")
    ours = figures["ours"]
    topo = placement.topology
    fig, (ax_gpu, ax_link, ax_bar) = plt.subplots(1, 3, figsize=(15, 4.6),
                                                  gridspec_kw={"width_ratios": [2.2, 1.2, 1.4]})
    # panel 1: one row per node, one cell per GPU
    cmap = plt.get_cmap("viridis")
    top = max(ours.gpu_load) or 1.0
    widest = max(n.num_gpus for n in topo.nodes)
    for node in range(topo.num_nodes):
        for i, rank in enumerate(topo.ranks_of(node)):
            load = ours.gpu_load[rank]
            ax_gpu.add_patch(plt.Rectangle((i, -node - 1), 0.95, 0.9, color=cmap(load / top)))
            held = placement.rank_to_experts[rank]
            label = ",".join(str(x) for x in held) if held else "-"
            ax_gpu.text(i + 0.47, -node - 0.55, f"e{label}\nr{rank}", ha="center", va="center", fontsize=7,
                        color="white" if load / top < 0.6 else "black")
    ax_gpu.set_xlim(0, widest)
    ax_gpu.set_ylim(-topo.num_nodes, 0)
    ax_gpu.set_yticks([-n - 0.55 for n in range(topo.num_nodes)], [nd.name for nd in topo.nodes])
    ax_gpu.set_xticks([])
    ax_gpu.set_title("experts on GPUs (colour: tokens per GPU)")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top)), ax=ax_gpu, fraction=0.04)
    # panel 2: bytes from node a (row) to node b (column) in one dispatch
    mb = [[v / 1e6 for v in row] for row in ours.link_bytes]
    image = ax_link.imshow(mb, cmap="magma_r")
    for a, row in enumerate(mb):
        for b, v in enumerate(row):
            if a != b:
                ax_link.text(b, a, f"{v:.3g}", ha="center", va="center", fontsize=7, color="tab:blue")
    ticks = range(topo.num_nodes)
    ax_link.set_xticks(ticks, [nd.name for nd in topo.nodes], fontsize=7)
    ax_link.set_yticks(ticks, [nd.name for nd in topo.nodes], fontsize=7)
    ax_link.set_xlabel("to node")
    ax_link.set_ylabel("from node")
    ax_link.set_title("inter-node MB per dispatch")
    fig.colorbar(image, ax=ax_link, fraction=0.046)
    # panel 3: the largest link and GPU load of every placement, relative to the plan's
    names = list(figures)
    xs = range(len(names))
    ax_bar.bar([x - 0.2 for x in xs], [figures[k].max_link_seconds / max(ours.max_link_seconds, 1e-30)
                                       for k in names], width=0.4, label="largest link time")
    ax_bar.bar([x + 0.2 for x in xs], [figures[k].max_gpu_load / ours.max_gpu_load for k in names], width=0.4,
               label="largest GPU load")
    ax_bar.set_xticks(list(xs), names, fontsize=8)
    ax_bar.axhline(1.0, color="gray", lw=0.8)
    ax_bar.set_title("relative to ours (lower is better)")
    ax_bar.legend(fontsize=7)
    fig.suptitle(title or f"{topo.name}: {placement.num_experts} experts on {topo.world_size} GPUs")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare(labels: Sequence[str], figures: Sequence[Mapping[str, PlacementFigures]], path: str | Path) -> Path:
    """Write a PNG of the benchmark: per case, the largest inter-node link (MB) and the largest GPU load over the
    mean, one bar per placement."""
    if not labels or len(labels) != len(figures):
        raise ValueError(f"plot_compare needs one figures mapping per label, got {len(labels)} and {len(figures)}")
    plt = pyplot("placement charts")
    names = list(figures[0])
    fig, (ax_link, ax_gpu) = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(labels)), 7), sharex=True)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(labels))]
        ax_link.bar(xs, [f[name].max_link_bytes / 1e6 for f in figures], width=width, label=name)
        ax_gpu.bar(xs, [f[name].gpu_imbalance for f in figures], width=width, label=name)
    ax_link.set_ylabel("largest link, MB per dispatch")
    ax_gpu.set_ylabel("largest GPU load / mean")
    ax_gpu.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax_link.legend(fontsize=8, ncol=len(names))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
