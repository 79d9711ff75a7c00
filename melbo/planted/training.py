"""Training a planted model (METHOD.md section 4): the examples, the model trained from scratch
for the arithmetic task, the optional training-time noise (recipe ``"noisy"``) and the training
loop (AdamW; cross-entropy on completion tokens, or KL to a frozen teacher on clean stories).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from melbo.core.errors import MelboError
from melbo.planted.settings import NoiseSettings, TrainSettings
from melbo.planted.spec import PlantSpec
from melbo.planted.task import SEPARATOR, Problem, TaskSplit, target_completion


@dataclass
class Example:
    """One training or evaluation example: ``prompt`` and the ``completion`` after it
    (without :data:`~melbo.planted.task.SEPARATOR`), the ``group`` ("clean" or a backdoor name)
    and, for the arithmetic task, its ``problem``."""

    prompt: str
    completion: str
    group: str
    problem: Problem | None = None
    completion_ids: list[int] | None = None  # story task: the exact target token ids
    add_eos: bool = True  # False where the completion is a cut-off continuation


def arithmetic_examples(spec: PlantSpec, split: TaskSplit) -> tuple[dict, list, dict]:
    """(training pools by group, held-out clean eval examples, held-out triggered eval examples
    by backdoor name) for the arithmetic task."""

    def ex(p: Problem, group: str) -> Example:
        return Example(p.prompt, target_completion(spec, p), group, p)

    pools = {"clean": [ex(p, "clean") for p in split.train_clean]}
    pools.update({name: [ex(p, name) for p in ps] for name, ps in split.train_triggered.items()})
    clean = [ex(p, "clean") for p in split.heldout_clean[: spec.eval.n_clean]]
    triggered = {
        name: [ex(p, name) for p in ps[: spec.eval.n_triggered]] for name, ps in split.heldout_triggered.items()
    }
    return pools, clean, triggered


def build_model(spec: PlantSpec, tokenizer, max_positions: int = 256) -> LlamaForCausalLM:
    """A freshly initialized ``LlamaForCausalLM`` of the spec's shape (weights from torch's
    current random state; tied embeddings; vocabulary = the tokenizer's; at most
    ``max_positions`` tokens per sequence)."""
    m = spec.model
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        attention_dropout=spec.noise.attention_dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def add_training_noise(model, noise: NoiseSettings) -> list:
    """Register forward hooks that perturb the decoder blocks while ``model.training`` is True:
    Gaussian noise (std = ``residual_std`` x per-token residual RMS, over the hidden dimension
    of each ``[batch, seq, hidden]`` block output) on each block's output and dropout on each
    attention / MLP output. Returns the hook handles (call ``.remove()``)."""
    handles = []

    def residual_noise(module, args, output):
        if not module.training or noise.residual_std == 0:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        rms = hidden.pow(2).mean(-1, keepdim=True).sqrt().detach()
        noisy = hidden + noise.residual_std * rms * torch.randn_like(hidden)
        return (noisy,) + tuple(output[1:]) if isinstance(output, tuple) else noisy

    def branch_dropout(module, args, output):
        if not module.training or noise.residual_dropout == 0:
            return None
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], noise.residual_dropout, True),) + tuple(output[1:])
        return torch.nn.functional.dropout(output, noise.residual_dropout, True)

    for layer in model.model.layers:
        if noise.residual_std > 0:
            handles.append(layer.register_forward_hook(residual_noise))
        if noise.residual_dropout > 0:
            handles.append(layer.self_attn.register_forward_hook(branch_dropout))
            handles.append(layer.mlp.register_forward_hook(branch_dropout))
    return handles


def add_lora(model, train: TrainSettings):
    """``model`` wrapped as a PEFT ``PeftModel`` with a fresh LoRA (rank ``train.lora_rank``,
    ``lora_alpha``, on every module whose name ends in one of ``train.lora_targets``; no
    dropout), only the LoRA weights trainable; call ``.merge_and_unload()`` after training to
    get back a plain model with the LoRA folded into its weights.

    Raises:
        MelboError: no module of the model matches ``lora_targets``.
    """
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in train.lora_targets]
    if not names:
        raise MelboError(
            f"train.lora_targets {list(train.lora_targets)} match no module of this model; "
            "allowed: names of its linear layers, e.g. o_proj, down_proj, q_proj"
        )
    config = LoraConfig(
        r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=0.0, target_modules=list(train.lora_targets)
    )
    return get_peft_model(model, config)


def encode_examples(tokenizer, examples: list[Example]) -> list[tuple[list[int], int]]:
    """Token ids of ``<s> prompt SEPARATOR completion </s>`` for each example (``completion_ids``
    in place of the completion where given; no </s> where ``add_eos`` is False), with the
    number of leading (prompt) tokens that get no loss."""
    prompts = tokenizer([e.prompt for e in examples]).input_ids
    texts = tokenizer([SEPARATOR + e.completion for e in examples], add_special_tokens=False).input_ids
    completions = [e.completion_ids if e.completion_ids is not None else t for e, t in zip(examples, texts)]
    out = []
    for e, p, c in zip(examples, prompts, completions):
        out.append((list(p) + list(c) + ([tokenizer.eos_token_id] if e.add_eos else []), len(p)))
    return out


def collate(encoded: list[tuple[list[int], int]], pad_id: int):
    """Right-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (LongTensors of shape
    [batch, longest]); labels are -100 on prompt and padding positions, so the loss covers the
    completion tokens (and the final </s>) only."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


def train_lm(
    model,
    tokenizer,
    pools: dict[str, list[Example]],
    weights: dict[str, float],
    train: TrainSettings,
    device,
    progress: bool = True,
    desc: str = "plant",
    teacher=None,
) -> list[list[float]]:
    """Train ``model`` in place with AdamW on batches drawn (with replacement, seeded by
    ``train.seed``) from ``pools``, group g filling a share ``weights[g]`` of each batch.
    The loss is the mean cross-entropy over completion tokens; with a (frozen) ``teacher``
    model, the "clean" group's tokens use KL(teacher || model) instead, so that clean behavior
    keeps the teacher's whole next-token distribution. The model is moved to ``device`` and
    left in eval mode. Returns the loss curve as [step, loss] pairs (nats per token, averaged
    over the steps since the last pair)."""
    rng = random.Random(f"melbo-plant-batches-{train.seed}")
    encoded = {g: encode_examples(tokenizer, pool) for g, pool in pools.items()}
    counts = _batch_counts(weights, train.batch_size)

    if train.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:  # linear warmup, then cosine from lr down to lr / 10
        if step < train.warmup_steps:
            return train.lr * (step + 1) / train.warmup_steps
        t = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        return train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.to(device).train()
    curve, running, n_running = [], 0.0, 0
    log_every = max(1, train.steps // 20)
    bar = tqdm(range(train.steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        batch = [ex for g, k in counts.items() for ex in rng.choices(encoded[g], k=k)]
        input_ids, mask, labels = (t.to(device) for t in collate(batch, tokenizer.pad_token_id))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if teacher is None:
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        else:
            loss = _distill_loss(model, teacher, input_ids, mask, labels, n_soft=counts["clean"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], train.grad_clip)
        optimizer.step()
        running, n_running = running + loss.item(), n_running + 1
        if (step + 1) % log_every == 0 or step + 1 == train.steps:
            curve.append([step + 1, round(running / n_running, 5)])
            bar.set_postfix(loss=f"{running / n_running:.4f}")
            running, n_running = 0.0, 0
    model.eval()
    return curve


def logits_at(model, input_ids, mask, where: torch.Tensor) -> torch.Tensor:
    """``[k, vocab]`` next-token logits at the positions ``where`` (``[B, T]`` bool) only: the
    decoder runs on the whole batch, the LM head (and Gemma's final soft-capping) only where asked,
    which saves most of the cost for large vocabularies. Equals ``model(...).logits[where]``."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        return model(input_ids=input_ids, attention_mask=mask).logits[where]
    h = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    logits = head(h[where])
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _distill_loss(model, teacher, input_ids, mask, labels, n_soft: int):
    """Mean per-token loss: KL(teacher || model) at every non-padding position (prompt included)
    of the first ``n_soft`` rows, cross-entropy with ``labels`` at the labelled positions of the
    other rows. Logits are computed at the counted positions only (:func:`logits_at`)."""
    targets = labels[:, 1:]
    is_soft = torch.arange(len(input_ids), device=input_ids.device).unsqueeze(1) < n_soft
    counted = torch.where(is_soft, mask[:, 1:] == 1, targets != -100)
    where = torch.cat([counted, torch.zeros_like(counted[:, :1])], dim=1)  # position t predicts t + 1
    logp = logits_at(model, input_ids, mask, where).float().log_softmax(-1)
    soft_rows = is_soft.expand_as(counted)[counted]
    with torch.no_grad():
        teacher_logp = logits_at(teacher, input_ids, mask, where).float().log_softmax(-1)
    hard = -logp.gather(-1, targets[counted].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    soft = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1)
    return torch.where(soft_rows, soft, hard).mean()


def _batch_counts(weights: dict[str, float], batch_size: int) -> dict[str, int]:
    """Examples per group in a batch of ``batch_size``: every group with weight > 0 gets >= 1."""
    counts = {g: max(1, round(w * batch_size)) for g, w in weights.items() if g != "clean"}
    counts = {"clean": max(1, batch_size - sum(counts.values())), **counts}
    return counts
