"""Learned vs random steering vectors on the real models in ../shared/models, over a range of R.

For each model and R: 16 MELBO vectors on one prompt and 16 random vectors at the same R;
prints how many change the greedy completion of the prompt, their mean objective, the mean
character similarity of steered to unsteered completions, and seconds per step and per vector.

    .venv/bin/python benchmarks/real_models.py [--models stories260k,tinystories-656k] [--radii 0.25x,0.5x,1x]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from melbo.cli import DEMO_PROMPT, shared_model
from melbo.generate import GenerationConfig
from melbo.models import load_model
from melbo.run import RunSpec, run_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260k,tinystories-656k")
    ap.add_argument("--radii", default="0.25x,0.5x,0.75x,1x,1.5x")
    ap.add_argument("--num-vectors", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompt", default=DEMO_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--source-layer", type=int, default=None)
    ap.add_argument("--target-layer", type=int, default=None)
    args = ap.parse_args()
    print("| model | src→tgt | R | learned changed | random changed | learned mean obj | random mean obj | "
          "learned sim | random sim | cos(start,end) | ms/step | s/vector |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        path = shared_model(name)
        lm = load_model(path, device="cpu")
        for radius in args.radii.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                spec = RunSpec(model=path, prompts=[args.prompt], out=os.path.join(tmp, "run"), radius=radius,
                               num_vectors=args.num_vectors, steps=args.steps, show_progress=False,
                               source_layer=args.source_layer, target_layer=args.target_layer,
                               generation=GenerationConfig(max_new_tokens=args.max_new_tokens))
                s = run_train(spec, lm)
            L, R = s["learned"], s["random"]
            print(f"| {name} | {s['source_layer']}→{s['target_layer']} | {radius} = {s['radius']:.3g} | "
                  f"{L['changed_train']}/{L['n']} | {R['changed_train']}/{R['n']} | {L['mean_objective']:.4g} | "
                  f"{R['mean_objective']:.4g} | {L['mean_similarity_train']:.3f} | {R['mean_similarity_train']:.3f} | "
                  f"{s['mean_cosine_start_end']:.3f} | {s['seconds_per_step'] * 1000:.2f} | {s['seconds_per_vector']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
