"""``largeep_plugin.hf.from_pretrained`` / ``save_pretrained`` at EP 4.

* from_pretrained gives exactly the weights ``convert_model`` gives after transformers' own loading, in both
  checkpoint layouts (the per-expert one transformers writes, sharded; the fused one ``save_pretrained`` writes),
  and reads no expert of another rank (the reader records every tensor and row it read).
* After three training steps of the converted model (different tokens on each rank, ``allreduce_gradients``),
  ``save_pretrained`` writes a checkpoint that plain transformers loads and whose logits equal the converted
  model's; past ``max_shard_size`` in shards with an index (an earlier save's files replaced), which
  ``from_pretrained`` loads too; the experts are gathered on rank 0 only.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import world  # noqa: E402
from hf_models import tiny_model, tokens  # noqa: E402

CASES = (("mixtral", 8), ("deepseek_v3", 4), ("qwen2_moe", 4), ("gpt_oss", 4))


def _expert_ids_read(reads: list[tuple[str, int | None]]) -> set[int]:
    """Global ids of the experts a reader touched (per-expert names, or rows of fused tensors)."""
    ids: set[int] = set()
    for name, row in reads:
        if ".experts." not in name:
            continue
        match = re.search(r"\.experts\.(\d+)\.", name)
        if match:
            ids.add(int(match.group(1)))
        elif row is not None:
            ids.add(row)
        else:
            ids.add(-1)  # a whole fused tensor: every expert
    return ids


def _checkpoint_world(rank: int, world_size: int, root: str) -> dict[str, float]:
    import largeep_plugin as lep
    from transformers import AutoModelForCausalLM

    from largeep_plugin.hf import convert_model, from_pretrained, save_pretrained
    from largeep_plugin.integrations.hf.checkpoint import SafetensorsReader, _gather_experts

    warnings.simplefilter("ignore")
    out: dict[str, float] = {}
    for family, e in CASES:
        for layout in ("per_expert", "fused"):
            path = f"{root}/{family}_{layout}"
            reader = SafetensorsReader(path)
            model = from_pretrained(path, allow_colocate=True, reader=reader)
            want = convert_model(AutoModelForCausalLM.from_pretrained(path), allow_colocate=True).state_dict()
            got = model.state_dict()
            out[f"{family} {layout} keys"] = float(set(got) != set(want))
            out[f"{family} {layout} weights"] = max(float((got[k] - want[k]).abs().max()) for k in want)
            held = {i for m in model.modules() if hasattr(m, "expert_ids") for i in m.expert_ids}
            out[f"{family} {layout} foreign experts read"] = float(len(_expert_ids_read(reader.reads) - held))
            out[f"{family} {layout} own experts read"] = float(_expert_ids_read(reader.reads) != held)
        # Train the converted model a little, save, reload unconverted with plain transformers.
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(3):
            ids = tokens(seed=100 * step + rank)
            model(ids, labels=ids).loss.backward()
            lep.allreduce_gradients(model)
            opt.step()
            opt.zero_grad()
        saved = f"{root}/{family}_trained"
        save_pretrained(model, saved, max_shard_size="1MB")   # stale shards of a sharded save must go
        files = save_pretrained(model, saved, max_shard_size="30KB")
        names = sorted(os.listdir(saved))
        if rank == 0:
            out[f"{family} sharded"] = float(len(files) < 2 or "model.safetensors.index.json" not in names
                                             or "model.safetensors" in names or bool(set(files) - set(names)))
        else:
            out[f"{family} other ranks write nothing"] = float(files != [])
        moe = next(m.moe for m in model.modules() if hasattr(m, "moe"))
        gathered = _gather_experts(moe)
        want_ids = None if rank else list(range(e))
        out[f"{family} experts only on rank 0"] = float((gathered and sorted(gathered)) != want_ids)
        reloaded = AutoModelForCausalLM.from_pretrained(saved)
        with torch.no_grad():
            out[f"{family} from_pretrained of sharded save"] = float(
                (from_pretrained(saved, allow_colocate=True)(tokens(seed=7)).logits
                 - model(tokens(seed=7)).logits).abs().max())
        ids = tokens(seed=7)
        with torch.no_grad():
            out[f"{family} reloaded logits"] = float((reloaded(ids).logits - model(ids).logits).abs().max())
            out[f"{family} trained moved"] = float(
                (reloaded(ids).logits - tiny_model(family, e)(ids).logits).abs().max() < 1e-3)
    return out


def test_from_pretrained_and_save_pretrained_at_ep4(tmp_path: Path) -> None:
    from largeep_plugin.hf import convert_model, save_pretrained

    for family, e in CASES:
        model = tiny_model(family, e)
        model.save_pretrained(tmp_path / f"{family}_per_expert", max_shard_size="20KB")   # sharded, with an index
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_pretrained(convert_model(model), str(tmp_path / f"{family}_fused"))     # one process: every expert
    per_rank = world(_checkpoint_world, 4, str(tmp_path), timeout=300.0)
    bad = {f"rank {r}: {k}": v for r, errs in enumerate(per_rank) for k, v in errs.items() if not v <= 1e-5}
    assert not bad, bad


def test_max_shard_size_errors_name_the_value() -> None:
    from largeep_plugin.integrations.hf.checkpoint import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(100) == 100
    for bad in ("5K", "many", "0", 0, -3, True):
        with pytest.raises(ValueError, match=f"max_shard_size={bad!r}"):
            parse_size(bad)
