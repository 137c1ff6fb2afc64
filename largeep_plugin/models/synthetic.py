"""Learnable synthetic next-token data: sequences drawn from a fixed random Markov chain.

Shape legend:
    B  sequences in a batch     S  sequence length     V  vocabulary size

Each token has ``branching`` possible successors with fixed random probabilities, so a model that learns the
chain goes from a loss of ln(V) (uniform guessing) down towards the chain's entropy rate (``entropy_floor``): the
drop is large and quick, which is what a demo needs to show that training works.

Token frequencies: with ``zipf=0`` every token is as likely a successor as any other, so all tokens are about
equally frequent. Text is not like that: its token frequencies fall off about as 1 / rank (Zipf's law, exponent
about 1). With ``zipf=s > 0`` the tokens get a random popularity order, and each token's successors are drawn
(without replacement) with weights ``1 / (1 + popularity rank) ** s``: popular tokens follow many tokens, and their
frequencies in the chain's sequences fall off as text's do. A router that learns on such data gets a skewed expert
load from the data itself, as a real router does.

The chain depends only on ``seed`` (and ``zipf``); a batch depends on (seed, rank, step), so runs are reproducible
and every rank sees different data.
"""
from __future__ import annotations

import math

import torch


class MarkovChainData:
    """Batches of token sequences from a fixed random Markov chain.

    Args:
        vocab_size: V (>= 2).
        branching: successors per token (1 <= branching <= V); fewer successors = lower floor.
        seed: fixes the chain.
        zipf: exponent of the successors' popularity (>= 0); 0 = every token equally popular (the chain of earlier
            releases, bit for bit), 1 = about text's token frequencies.
    """

    def __init__(self, vocab_size: int, *, branching: int = 4, seed: int = 0, zipf: float = 0.0):
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} must be >= 2")
        if not 1 <= branching <= vocab_size:
            raise ValueError(f"branching={branching} must be between 1 and vocab_size={vocab_size}")
        if not (isinstance(zipf, (int, float)) and math.isfinite(zipf) and zipf >= 0):
            raise ValueError(f"zipf={zipf!r} must be a finite number >= 0")
        self.vocab_size = vocab_size
        self.seed = seed
        self.zipf = float(zipf)
        gen = torch.Generator().manual_seed(seed)
        # Step 1: each token gets `branching` distinct successors ...
        if zipf == 0:
            successors_VB = torch.stack([torch.randperm(vocab_size, generator=gen)[:branching]
                                         for _ in range(vocab_size)])
        else:  # ... popular tokens (a random order of the vocabulary) more often
            popularity_V = torch.empty(vocab_size, dtype=torch.float64)
            popularity_V[torch.randperm(vocab_size, generator=gen)] = (
                torch.arange(1, vocab_size + 1, dtype=torch.float64) ** -self.zipf)
            successors_VB = torch.multinomial(popularity_V.expand(vocab_size, -1), branching, generator=gen)
        # Step 2: ... with random, clearly unequal probabilities (a uniform choice would be too easy to read).
        weights_VB = torch.rand(vocab_size, branching, generator=gen, dtype=torch.float64) + 0.2
        self.transition_VV = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
        self.transition_VV.scatter_(1, successors_VB, weights_VB / weights_VB.sum(1, keepdim=True))

    def stationary(self) -> torch.Tensor:
        """float64 [V]: how often each token occurs in long sequences (power iteration; a random chain mixes
        quickly)."""
        pi_V = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        for _ in range(500):
            pi_V = pi_V @ self.transition_VV
        return pi_V

    def entropy_floor(self) -> float:
        """Entropy rate of the chain in nats: the lowest mean loss a perfect next-token model reaches."""
        p = self.transition_VV
        row_entropy_V = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
        return float((self.stationary() * row_entropy_V).sum())

    @staticmethod
    def uniform_loss(vocab_size: int) -> float:
        """Loss of a uniform guess: ln(V)."""
        return math.log(vocab_size)

    def batch(self, batch_size: int, seq_len: int, *, rank: int = 0, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of inputs and next-token targets.

        Returns:
            tokens_BS, targets_BS: int64; ``targets[:, i] == tokens[:, i + 1]`` inside the sequence.
        """
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + rank) * 1_000_033 + step) % (2**63))
        seq_BS1 = torch.empty(batch_size, seq_len + 1, dtype=torch.int64)
        seq_BS1[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=gen)
        for i in range(seq_len):
            seq_BS1[:, i + 1] = torch.multinomial(self.transition_VV[seq_BS1[:, i]], 1, generator=gen).squeeze(1)
        return seq_BS1[:, :-1], seq_BS1[:, 1:]
