"""Populations of steering vectors at once: vectors per second of melbo.train one vector after
another (batch_vectors=1, METHOD.md's sequential method), N vectors at once (batch_vectors=N),
DCT (N factors in one fit), the rank-1 population (N rank-1 adapters in one fit) and the naive
reference (full model every step, one vector; its per-step time measured over 3 steps and
scaled to the same steps), at equal steps, with the mean objective of each (DCT's and the rank-1
factors' are their own, not comparable), max |‖θ‖ − R|, the largest pairwise |cos|, and the achieved FLOP/s
against this machine's measured matmul FLOP/s.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/populations.py --model gemma-3-270m --vectors 64 --steps 20
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/populations.py --model qwen-1.8b-shape --vectors 64 --steps 5

``--model qwen-1.8b-shape`` builds a random Qwen2 model of Qwen1.5-1.8B's shape (24 blocks,
d_model 2048, MLP 5504, 16 heads, vocabulary 151,936) in memory. The sequential run trains
``--sequential`` vectors (default all) and is reported per vector (its cost per vector does not
depend on how many there are). FLOPs are counted as 6 x (parameters of blocks src+1..tgt) x
tokens per vector-step (forward 2, backward 4; attention scores left out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import melbo
from melbo.cli.demo import GEMMA_PROMPT
from melbo.core.models import default_layers, load_model, wrap_model
from melbo.core.prompts import encode_prompts
from melbo.methods.rank1 import overlap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import reference_seconds  # noqa: E402  (the naive reference step, beside this script)


def qwen_shape(device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from melbo.planted.tokenizer import build_char_tokenizer

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    tok = build_char_tokenizer()  # any tokenizer will do: the weights are random
    return wrap_model(model, tok, name="random Qwen1.5-1.8B shape")


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def max_cos(v: torch.Tensor) -> float:
    u = v / v.norm(dim=1, keepdim=True)
    g = u @ u.T - torch.eye(len(u))
    return float(g.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m", help="a model path or name, or qwen-1.8b-shape")
    ap.add_argument("--prompt", default=GEMMA_PROMPT)
    ap.add_argument("--vectors", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=None, help="vectors of the sequential run (default: all)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--radius", default="0.01x")
    ap.add_argument("--skip", default="", help="comma list of rows to leave out: naive, batched, dct, rank1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 (vectors stay float32)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model == "qwen-1.8b-shape":
        lm = qwen_shape(args.device, dt)
    else:
        lm = load_model(args.model, args.device, args.dtype)
    peak = matmul_flops(lm.device, dt)
    n_tok = len(lm.tokenizer(args.prompt)["input_ids"])
    src, tgt = default_layers(lm.num_layers)
    params = sum(p.numel() for b in lm.blocks[src + 1 : tgt + 1] for p in b.parameters())
    common = dict(radius=args.radius, evaluate=False, show_progress=False, seed=0)
    rows = []
    print(
        f"{lm.name}: {lm.num_layers} blocks, d_model {lm.d_model}, blocks {src + 1}..{tgt} ({params / 1e6:.1f}M "
        f"parameters), {n_tok} tokens, {torch.get_num_threads()} thread(s), {lm.device} {dt}, "
        f"matmul {peak / 1e9:.1f} GFLOP/s",
        flush=True,
    )

    def add(label, n, sec, obj, dnorm, cos, steps):
        flops = 6 * params * n_tok * n * steps / sec if steps else float("nan")
        rows.append((label, n, sec, n / sec, obj, dnorm, cos, flops))
        print(f"{label}: {n} in {sec:.1f} s", flush=True)

    if "naive" not in skip:  # the reference: full model every step, one vector, measured for 3 steps
        batch = encode_prompts(lm.tokenizer, [args.prompt], "all")
        per_step = reference_seconds(lm, batch, src, tgt, 3)
        add(
            "naive reference (full model, 1 vector; 3 steps timed)",
            1,
            per_step * args.steps,
            float("nan"),
            0,
            0,
            args.steps,
        )

    def run(label: str, n: int, method: str = "melbo", **kw) -> None:
        t0 = time.perf_counter()
        bank = melbo.train(lm, args.prompt, method, num_vectors=n, **{**common, **kw})
        sec = time.perf_counter() - t0
        obj = [o for o in (bank.info(i).get("objective") for i in range(len(bank))) if o is not None]
        if bank.kind == "vector":
            v = bank.vectors
            dnorm, cos = float((v.norm(dim=1) - bank.meta["radius"]).abs().max()), max_cos(v)
        else:  # rank-1 factors: unit a and b; the overlap (a_i·a_j)(b_i·b_j)
            a, b = bank.tensors["omega_a"], bank.tensors["omega_b"]
            dnorm = float(max((a.norm(dim=1) - 1).abs().max(), (b.norm(dim=1) - 1).abs().max()))
            cos = float(overlap(a, b).abs().max())
        steps = kw.get("steps") or int(bank.meta.get("iterations", 0) or 0)
        add(label, n, sec, sum(obj) / max(1, len(obj)), dnorm, cos, steps)

    run("sequential melbo (batch_vectors=1)", args.sequential or args.vectors, batch_vectors=1, steps=args.steps)
    if "batched" not in skip:
        run(f"batched melbo (batch_vectors={args.vectors})", args.vectors, batch_vectors=args.vectors, steps=args.steps)
    if "dct" not in skip:
        run("DCT (one fit)", args.vectors, "dct", factors=args.vectors)
    if "rank1" not in skip:
        run("rank-1 population (one fit)", args.vectors, "rank1", steps=args.steps)
    seq = next(r[3] for r in rows if r[0].startswith("sequential"))
    head = "| method | vectors | seconds | vectors/s | x sequential | mean objective | max ‖θ‖−R | max pairwise cos |"
    print("\n" + head + " GFLOP/s (% of matmul) |\n" + "|---" * 9 + "|")
    for label, n, sec, vps, obj, dnorm, cos, flops in rows:
        share = f"{flops / 1e9:.1f} ({100 * flops / peak:.0f}%)" if flops == flops else "-"
        cells = [label, n, f"{sec:.1f}", f"{vps:.3f}", f"{vps / seq:.2f}", f"{obj:.4g}", f"{dnorm:.1e}", f"{cos:.1e}"]
        print("| " + " | ".join(map(str, cells)) + f" | {share} |")


if __name__ == "__main__":
    main()
