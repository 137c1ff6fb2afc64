"""PNG charts of predictions: tokens/s against EP size, and where a training step's time goes per layout.

matplotlib is imported inside the functions (Agg backend, no display needed) so that the model itself needs
only the standard library.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from largeep_plugin.perfmodel.training import BREAKDOWN_KEYS, TrainingResult
from largeep_plugin.tools.pyplot import pyplot


def plot_ep_sweep(results: Sequence[TrainingResult], path: str | Path, title: str = "") -> Path:
    """Tokens/s (and MFU on a second axis) against EP size, one point per result; writes a PNG."""
    if not results:
        raise ValueError("plot_ep_sweep needs at least one result")
    plt = pyplot("performance-model plots")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    eps = [r.layout.ep for r in results]
    ax.plot(eps, [r.tokens_per_s for r in results], "o-", label="tokens/s")
    for r in results:
        # A layout whose memory does not fit is still predicted (its time is real), but marked.
        label = r.layout.name + ("" if r.memory.fits else " (does not fit)")
        ax.annotate(label, (r.layout.ep, r.tokens_per_s), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7, color="black" if r.memory.fits else "tab:red")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expert-parallel size (EP)")
    ax.set_ylabel("training tokens/s")
    ax.set_ylim(bottom=0)  # a truncated axis would exaggerate differences of a few percent
    ax2 = ax.twinx()
    ax2.plot(eps, [100 * r.mfu for r in results], "s--", color="tab:orange", label="MFU %")
    ax2.set_ylabel("MFU (%)")
    ax2.set_ylim(0, 100)
    ax.set_title(title or "predicted throughput against EP size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_breakdown(results: Sequence[TrainingResult], path: str | Path, title: str = "") -> Path:
    """Stacked bars of seconds per step by part (the breakdown), one bar per layout; writes a PNG."""
    if not results:
        raise ValueError("plot_breakdown needs at least one result")
    plt = pyplot("performance-model plots")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(results) + 3.0), 4.4))
    names = [r.layout.name for r in results]
    bottom = [0.0] * len(results)
    cmap = plt.get_cmap("tab20")
    for i, key in enumerate(BREAKDOWN_KEYS):
        values = [r.breakdown.get(key, 0.0) for r in results]
        if not any(values):
            continue
        ax.bar(names, values, bottom=bottom, label=key, color=cmap(i))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per training step")
    ax.set_title(title or "where a training step's time goes")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
