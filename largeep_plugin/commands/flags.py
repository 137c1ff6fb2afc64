"""argparse types that check a flag's value where it is parsed.

    p.add_argument("--vocab-size", type=int_at_least(2), default=64)
    p.add_argument("--compare-ep", type=int_list(2), default="4,8,16")

A bad value is argparse's own error, ``largeep demo: error: argument --vocab-size: must be an integer >= 2,
got '1'``, exit status 2, before any rank starts: never a traceback from inside a rank minutes later.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


def number(low: float = -math.inf, *, above: bool = False) -> Callable[[str], float]:
    """A finite number >= ``low`` (> ``low`` with ``above``)."""
    bound = f"> {low:g}" if above else f">= {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value
    return parse


def int_list(low: int) -> Callable[[str], list[int]]:
    """A comma-separated, non-empty list of integers, each >= ``low``."""
    def parse(text: str) -> list[int]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or not all(_is_int(t) and int(t) >= low for t in items):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers >= {low}, got {text!r}")
        return [int(t) for t in items]
    return parse


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def add_model_flags(p: argparse.ArgumentParser, *, batch_size: int, seq_len: int, hidden_size: int,
                    ffn_hidden_size: int, num_layers: int, num_heads: int, top_k: int) -> None:
    """The flags of a small MoE transformer and its tokens per rank (``largeep demo``, ``largeep bench hf``), with
    the caller's defaults."""
    pos = int_at_least(1)
    p.add_argument("--batch-size", type=pos, default=batch_size, help=f"sequences per rank per step (default {batch_size})")
    p.add_argument("--seq-len", type=pos, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    p.add_argument("--hidden-size", type=pos, default=hidden_size, help=f"model width H (default {hidden_size})")
    p.add_argument("--ffn-hidden-size", type=pos, default=ffn_hidden_size,
                   help=f"expert MLP width (default {ffn_hidden_size})")
    p.add_argument("--num-layers", type=pos, default=num_layers,
                   help=f"transformer layers, one MoE block each (default {num_layers})")
    p.add_argument("--num-heads", type=pos, default=num_heads, help=f"attention heads (default {num_heads})")
    p.add_argument("--top-k", type=pos, default=top_k, help=f"experts per token (default {top_k})")
