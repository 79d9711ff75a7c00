"""Steered generation: completions of prompts with a steering vector added after a block.

Generation uses ``transformers``' ``generate`` (greedy by default; sampling on request), batched
over vectors x prompts: every row of the batch carries its own vector (a zero row is the
unsteered model), so one ``generate`` call serves many vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from melbo.errors import MelboError
from melbo.models import LoadedModel
from melbo.prompts import check_prompts, format_prompt
from melbo.steer import steer


@dataclass
class GenerationConfig:
    """How completions are generated.

    Attributes:
        max_new_tokens: tokens generated after the prompt (the post's lesson: at least ~50, or
            correct answers are cut short).
        temperature: 0 is greedy decoding; > 0 samples.
        top_p: nucleus sampling threshold (with temperature > 0).
        chat: wrap each prompt in the tokenizer's chat template (when it has one).
        batch_size: rows (vectors x prompts) per ``generate`` call.
        seed: sampling seed.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    chat: bool = False
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MelboError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MelboError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MelboError(f"top-p must be in (0, 1], got {self.top_p}")


def generate(lm: LoadedModel, prompts: list[str], vectors: torch.Tensor | None, layer: int,
             scale: float = 1.0, cfg: GenerationConfig | None = None) -> list[list[str]]:
    """Completions of every prompt under every vector.

    Args:
        lm: the model.
        prompts: ``n`` prompts.
        vectors: ``[V, d_model]`` (a zero row gives the unsteered completion); None = unsteered.
        layer: the block after which vectors are added (the source layer).
        scale: multiplier of every vector.
        cfg: generation settings.

    Returns:
        ``completions[v][i]``: the text generated for prompt ``i`` under vector ``v`` (the prompt
        itself not included, special tokens dropped). With ``vectors=None``, one row.
    """
    cfg = cfg or GenerationConfig()
    check_prompts(prompts)
    d = lm.d_model
    vecs = torch.zeros(1, d) if vectors is None else vectors.detach().float().cpu()
    if vecs.dim() != 2 or vecs.shape[1] != d:
        raise MelboError(f"vectors must be [V, {d}], got {tuple(vecs.shape)}")
    tok = lm.tokenizer
    texts = [format_prompt(tok, p, cfg.chat) for p in prompts]
    special = not (cfg.chat and getattr(tok, "chat_template", None))
    rows = [(v, i) for v in range(len(vecs)) for i in range(len(prompts))]
    out: list[list[str]] = [["" for _ in prompts] for _ in range(len(vecs))]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start:start + cfg.batch_size]
            enc = tok([texts[i] for _, i in chunk], return_tensors="pt", padding=True, add_special_tokens=special)
            enc = {k: v.to(lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            row_vecs = vecs[[v for v, _ in chunk]].to(lm.device)
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id)
            if cfg.temperature > 0:
                kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
                torch.manual_seed(cfg.seed + start)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad(), steer(lm.blocks, layer, row_vecs, scale):
                gen = lm.model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1]:]
            for (v, i), ids in zip(chunk, new):
                out[v][i] = tok.decode(ids, skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out
