"""Learned vs random steering vectors on the real models in ../shared/models, over a range of R.

For each model and R: 16 MELBO vectors on one prompt and 16 random vectors at the same R;
prints how many change the greedy completion of the prompt, their mean objective, the mean
character similarity of steered to unsteered completions, and seconds per step and per vector.

    .venv/bin/python benchmarks/real_models.py [--models stories260k,tinystories-656k] [--radii 0.02x,0.05x,0.1x]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import melbo
from melbo.cli.demo import DEMO_PROMPT, shared_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260k,tinystories-656k")
    ap.add_argument("--radii", default="0.02x,0.05x,0.1x,0.2x,0.5x")
    ap.add_argument("--num-vectors", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompt", default=DEMO_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--source-layer", type=int, default=None)
    ap.add_argument("--target-layer", type=int, default=None)
    args = ap.parse_args()
    print(
        "| model | src→tgt | R | learned changed | random changed | learned mean obj | random mean obj | "
        "learned sim | random sim | cos(start,end) | ms/step | s/vector |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    layers = {
        k: v for k, v in (("source_layer", args.source_layer), ("target_layer", args.target_layer)) if v is not None
    }
    for name in args.models.split(","):
        lm = melbo.load_model(shared_model(name), device="cpu")
        for radius in args.radii.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                bank = melbo.train(
                    lm,
                    [args.prompt],
                    out=os.path.join(tmp, "run"),
                    radius=radius,
                    num_vectors=args.num_vectors,
                    steps=args.steps,
                    show_progress=False,
                    generation=melbo.GenerationConfig(max_new_tokens=args.max_new_tokens),
                    **layers,
                )
            s, m = bank.evaluation, bank.meta
            L, R = s["learned"], s["random"]
            cos = sum(v["cosine_start_end"] for v in m["vectors"]) / len(m["vectors"])
            print(
                f"| {name} | {m['source_layer']}→{m['target_layer']} | {radius} = {m['radius']:.3g} | "
                f"{L['changed_train']}/{L['n']} | {R['changed_train']}/{R['n']} | {L['mean_objective']:.4g} | "
                f"{R['mean_objective']:.4g} | {L['mean_similarity_train']:.3f} | {R['mean_similarity_train']:.3f} | "
                f"{cos:.3f} | {s['seconds_per_step'] * 1000:.2f} | {s['seconds_per_vector']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
