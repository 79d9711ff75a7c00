"""Seconds per MELBO optimizer step: melbo's truncated pass (blocks src+1..tgt only, h_src and Z(0)
cached, no LM head, V vectors at once) against the reference way (full model every step, one
vector at a time).

    .venv/bin/python benchmarks/speed.py [--model PATH] [--steps 100] [--vectors 1,8] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch

from melbo.cli.demo import DEMO_PROMPT, shared_model
from melbo.core.hooks import block_output, steer
from melbo.core.models import default_layers, load_model
from melbo.core.prompts import encode_prompts
from melbo.core.slice import Slice, melbo_objective
from melbo.core.sphere import random_vectors
from melbo.methods.melbo_train import make_optimizer, train_step

RADIUS, P, Q, LR = 1.0, 2.0, 1.0, 1e-3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_seconds(lm, batch, src, tgt, steps) -> float:
    """Full model, steering hook, one vector: what the reference notebook does each step."""
    theta = random_vectors(1, lm.d_model, RADIUS, 0)[0].to(lm.device).requires_grad_(True)
    opt = make_optimizer(theta, LR)
    ids = batch.input_ids.to(lm.device)
    got = {}
    hook = lm.blocks[tgt].register_forward_hook(lambda m, a, o: got.__setitem__("z", block_output(o)))
    with torch.no_grad():
        lm.model(input_ids=ids)
        z0 = got["z"]
    mask = batch.target_mask.to(lm.device)
    sync(lm.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        with steer(lm.blocks, src, theta):
            lm.model(input_ids=ids)
        (-melbo_objective(got["z"][None], z0, mask, P, Q).sum()).backward()
        opt.step()
    sync(lm.device)
    hook.remove()
    return (time.perf_counter() - t0) / steps


def fast_seconds(sl, steps, V) -> float:
    theta = random_vectors(V, sl.d_model, RADIUS, 0).to(sl.h_src.device).requires_grad_(True)
    opt = make_optimizer(theta, LR)
    sync(sl.h_src.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(sl, theta, opt, RADIUS, P, Q, None)
    sync(sl.h_src.device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: ../shared/models/stories260k")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--vectors", default="1,8,64", help="vector batch sizes for the fast path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or shared_model("stories260k")
    lm = load_model(path, device=args.device, dtype=args.dtype)
    src, tgt = default_layers(lm.num_layers)
    batch = encode_prompts(lm.tokenizer, [DEMO_PROMPT], "all")
    sl = Slice(lm.model, lm.blocks, batch, src, tgt)
    print(
        f"{path}: {lm.num_layers} blocks, d_model {lm.d_model}, src {src} -> tgt {tgt}, "
        f"{batch.input_ids.shape[1]} tokens, {lm.device}, {next(lm.model.parameters()).dtype}, "
        f"{args.threads} thread(s)"
    )
    ref = reference_seconds(lm, batch, src, tgt, args.steps)
    print(f"reference (full model, 1 vector): {ref * 1000:.2f} ms per step per vector")
    for V in (int(v) for v in args.vectors.split(",")):
        s = fast_seconds(sl, args.steps, V)
        print(
            f"melbo (blocks {src + 1}..{tgt}, {V} vectors at once): {s * 1000:.2f} ms per step, "
            f"{s / V * 1000:.3f} ms per step per vector ({ref / (s / V):.1f}x)"
        )


if __name__ == "__main__":
    main()
