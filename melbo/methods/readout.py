"""Readouts that rank DCT factors by their effect on chosen tokens (METHOD.md section 5,
"or by the effect on a chosen readout (e.g. a logit difference)")."""

from __future__ import annotations

from collections.abc import Callable

import torch

from melbo.core.errors import MelboError
from melbo.core.hooks import steer
from melbo.core.models import LoadedModel
from melbo.core.prompts import encode_prompts


def logit_readout(
    lm: LoadedModel,
    prompts: list[str],
    layer: int,
    plus: list[int] | int,
    minus: list[int] | int | None = None,
    chat: bool = False,
    batch_size: int = 64,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A readout for :func:`rank_factors`: for vectors ``[k, d]``, the mean over prompts of the
    next-token logit of ``plus`` minus that of ``minus`` (each token list averaged) at the last
    prompt token, with the vector added after block ``layer``. ``[k]`` float32.

    Raises:
        MelboError: no prompts, an empty token list.
    """
    batch = encode_prompts(lm.tokenizer, prompts, "last:1", chat)
    plus_ids = [plus] if isinstance(plus, int) else list(plus)
    minus_ids = [] if minus is None else ([minus] if isinstance(minus, int) else list(minus))
    if not plus_ids:
        raise MelboError("the logit readout needs at least one token id to raise")
    lengths = batch.attention_mask.sum(1) - 1
    n = len(batch)

    def readout(vectors: torch.Tensor) -> torch.Tensor:
        k = vectors.shape[0]
        scores = torch.zeros(k)
        per = max(1, batch_size // n)
        for s in range(0, k, per):
            vec = vectors[s : s + per].to(lm.device)
            kk = vec.shape[0]
            ids = batch.input_ids.repeat(kk, 1).to(lm.device)
            att = batch.attention_mask.repeat(kk, 1).to(lm.device)
            rows = vec.repeat_interleave(n, dim=0)
            with torch.no_grad(), steer(lm.blocks, layer, rows):
                logits = lm.model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
            last = logits[torch.arange(kk * n), lengths.repeat(kk).to(lm.device)]
            diff = last[:, plus_ids].mean(-1)
            if minus_ids:
                diff = diff - last[:, minus_ids].mean(-1)
            scores[s : s + kk] = diff.reshape(kk, n).mean(-1).cpu()
        return scores

    return readout
