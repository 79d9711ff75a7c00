"""Can *any* steering vector elicit a planted behavior? A supervised ceiling for the benchmark.

The planted-behavior benchmark (``melbo bench backdoor``) asks whether an *unsupervised* method
finds a backdoor. When nothing finds it, the subject may be the problem (the issue's hypothesis):
no vector of that norm at that layer may switch the model into the behavior at all. This script
measures that directly: for each planted behavior and each R it trains one steering vector with
the behavior's phrase as the *label* (cross-entropy of ``SEPARATOR + answer`` after the clean
prompts, vector added after the source block at every position, projected back to norm R after
each Adam step, as in METHOD.md section 1), then generates greedily and reports how often the
behavior fires on the training prompts and on 20 other clean prompts, and how close the method's
vectors come to it: the largest |cosine| between the supervised vector and the 64 vectors of the
task's default DCT setting (``melbo bench backdoor --method dct`` on the same prompts), beside the
same for the 64 random vectors.

    python benchmarks/reachability.py --model melbo/data/planted-default --radii 0.1x,0.25x,0.5x,1x
    python benchmarks/reachability.py --model melbo/data/planted-story --radii 0.05x,0.1x,0.2x

Prints a table; writes nothing. No network.
"""

from __future__ import annotations

import argparse
import time

import torch

from melbo.core.generate import GenerationConfig, generate
from melbo.core.hooks import steer
from melbo.core.models import default_layers
from melbo.core.prompts import encode_prompts
from melbo.core.radius import parse_radius
from melbo.core.slice import Slice
from melbo.planted.bench import bench_prompts, learn
from melbo.planted.bench_config import setting_from_options
from melbo.planted.fixtures import load_planted_lm
from melbo.planted.scoring import Judge
from melbo.planted.task import SEPARATOR


def supervised_vector(
    lm, prompts: list[str], answer: str, layer: int, radius: float, steps: int, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """A vector of norm ``radius`` trained to make the model write ``answer`` after ``prompts``.
    Returns ``(vector [d_model], final mean cross-entropy per answer token in nats)``."""
    tok = lm.tokenizer
    rows = []
    for p in prompts:
        ids_p = tok(p).input_ids
        ids_a = tok(SEPARATOR + answer, add_special_tokens=False).input_ids
        rows.append((ids_p + ids_a, len(ids_p)))
    width = max(len(r) for r, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(lm.d_model, generator=g)
    v = (v * radius / v.norm()).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.05 * radius)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        with steer(lm.blocks, layer, v):
            loss = lm.model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            v.mul_(radius / v.norm())
    return v.detach(), float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="A planted model folder (melbo plant).")
    ap.add_argument(
        "--radii", default="0.1x,0.25x,0.5x,1x", help="R values: numbers or kx (x the median residual norm)."
    )
    ap.add_argument("--num-prompts", type=int, default=4, help="Clean training prompts.")
    ap.add_argument("--source-layer", type=int, default=None, help="Default: as melbo train.")
    ap.add_argument("--steps", type=int, default=200, help="Adam steps per vector.")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    torch.manual_seed(0)
    lm, spec = load_planted_lm(args.model)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    train, general = bench_prompts(spec, None, 20, None, args.num_prompts)
    src = default_layers(lm.num_layers)[0] if args.source_layer is None else args.source_layer
    norm = Slice(
        lm.model, lm.blocks, encode_prompts(lm.tokenizer, train, "all"), src, min(src + 1, lm.num_layers - 1)
    ).residual_norm()
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    judge = Judge(lm, spec, gen)
    judge.prepare(train + general)
    print(
        f"model {args.model} (spec {spec.name!r}), source layer {src}, residual norm {norm:.3g}, "
        f"{len(train)} training prompts, {len(general)} other prompts, {args.steps} steps"
    )
    dct = setting_from_options("dct", spec.task, num_vectors=64, source_layer=src)
    found = learn(lm, train, dct)
    unit = torch.nn.functional.normalize(found["learned"].vectors, dim=-1)
    unit_random = torch.nn.functional.normalize(found["random"].vectors, dim=-1)
    print(f"DCT for comparison: {dct.label()}")
    print(
        f"{'behavior':<10} {'R':>10} {'CE/token':>9} {'train fires':>12} {'others fire':>12} "
        f"{'max|cos| DCT':>13} {'random':>7} {'s':>5}  sample"
    )
    for b in spec.backdoors:
        for r in args.radii.split(","):
            radius = parse_radius(r).resolve(norm)
            t0 = time.perf_counter()
            v, ce = supervised_vector(lm, train, b.answer, src, radius, args.steps)
            fired = []
            for prompts in (train, general):
                comps = generate(lm, prompts, v[None], src, 1.0, gen)[0]
                fired.append([judge.label(p, c) == f"backdoor:{b.name}" for p, c in zip(prompts, comps)])
                if prompts is train:
                    sample = " ".join(comps[0].split())[:50]
            u = v / v.norm()
            cos_dct = float((unit @ u).abs().max())
            cos_random = float((unit_random @ u).abs().max())
            print(
                f"{b.name:<10} {r + f' ({radius:.3g})':>10} {ce:9.3f} {sum(fired[0]):>5}/{len(train):<6} "
                f"{sum(fired[1]):>5}/{len(general):<6} {cos_dct:13.2f} {cos_random:7.2f} "
                f"{time.perf_counter() - t0:5.1f}  {sample}"
            )


if __name__ == "__main__":
    main()
