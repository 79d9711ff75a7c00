"""Proof in llama.cpp itself that ``melbo export gguf`` writes a control vector llama.cpp applies
at the same site as melbo: logits of llama.cpp with the control vector against melbo's steered
transformers logits, on a real model converted with llama.cpp's own converter.

Opt-in (not a test: it needs llama-cpp-python, built from its PyPI source package, and llama.cpp's
``convert_hf_to_gguf.py``, which that package vendors):

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/llama
    tar xzf /tmp/llama/llama_cpp_python-*.tar.gz -C /tmp/llama
    .venv/bin/pip install scikit-build-core cmake ninja diskcache sentencepiece
    CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
        .venv/bin/pip install --no-deps --no-build-isolation /tmp/llama/llama_cpp_python-*.tar.gz  # ~25 min, 1 core
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llama_cpp_check.py \
        --converter /tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py

Steps: convert ``../shared/models/stories260k`` to an F32 GGUF; train MELBO vectors on it with
melbo (source layer 2 of 5); export one with ``melbo.export_gguf``; read the file back with the
loader's rules (``melbo.core.control_vector.read_control_vector``) and hand its directions to
llama.cpp's control-vector API (``llama_set_adapter_cvec``, the call ``--control-vector`` makes);
compare next-token logits at every prompt position, unsteered and steered, at several scales.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import melbo
from melbo.core.control_vector import read_control_vector

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time, there was a little girl named Lily.", "The dog ran to the park and saw a"]


def convert(converter: str, model_dir: Path, out: Path) -> None:
    cmd = [sys.executable, converter, str(model_dir), "--outtype", "f32", "--outfile", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llama.cpp's converter failed:\n{r.stderr[-3000:]}")


def llama_logits(llm, llama_cpp, ids: list[int], cv_path: Path | None, n_layer: int) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` from llama.cpp, with the control vector file applied (or none)."""
    ctx = llm.ctx
    # renamed in 2026; the old name still exists as a deprecated wrapper
    set_cvec = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
    if cv_path is None:
        rc = set_cvec(ctx, None, 0, llm.n_embd(), 0, 0)
    else:
        cv = read_control_vector(cv_path)
        n_embd = cv.n_embd
        data = np.zeros(n_embd * n_layer, dtype=np.float32)  # slot il-1 holds direction.il
        for k, t in cv.directions.items():
            data[(k - 1) * n_embd : k * n_embd] = t.numpy()
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = set_cvec(ctx, ptr, data.size, n_embd, 1, n_layer)
    if rc != 0:
        sys.exit(f"llama_set_adapter_cvec returned {rc}")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--converter", required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "stories260k"))
    ap.add_argument("--source-layer", type=int, default=2)
    ap.add_argument("--radius", default="0.5x")
    ap.add_argument("--vector", type=int, default=0)
    ap.add_argument("--scales", default="1,-1,2")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed; see this script's docstring for the build")
    torch.set_num_threads(1)
    lm = melbo.load_model(args.model, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        gguf_model = Path(tmp) / "model-f32.gguf"
        convert(args.converter, Path(args.model), gguf_model)
        bank = melbo.train(
            lm,
            PROMPTS[:1],
            num_vectors=4,
            steps=60,
            radius=args.radius,
            source_layer=args.source_layer,
            show_progress=False,
        )
        llm = llama_cpp.Llama(model_path=str(gguf_model), logits_all=True, n_ctx=256, verbose=False, n_threads=1)
        n_layer = lm.num_layers
        print(
            f"llama-cpp-python {llama_cpp.__version__}; model {Path(args.model).name} ({n_layer} blocks, "
            f"d_model {lm.d_model}); vector {args.vector} at block {bank.layer}, R = {bank[args.vector].norm:.4g}"
        )
        print(
            "| prompt | scale | max abs Δ logit, llama.cpp vs melbo | steering effect (max abs, melbo) | top-1 agree |"
        )
        print("|---|---|---|---|---|")
        worst, worst_plain, worst_ratio = 0.0, 0.0, 0.0
        for p, prompt in enumerate(PROMPTS):
            ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                hf_plain = lm.model(ids).logits[0].double().numpy()
            ll_plain = llama_logits(llm, llama_cpp, ids[0].tolist(), None, n_layer)
            d0 = float(np.abs(ll_plain - hf_plain).max())
            print(f"| {p} | unsteered | {d0:.2e} | 0 | {np.mean(ll_plain.argmax(1) == hf_plain.argmax(1)):.2f} |")
            worst_plain = max(worst_plain, d0)
            for s in (float(x) for x in args.scales.split(",")):
                cv_path = Path(tmp) / f"cv-{p}-{s}.gguf"
                melbo.export_gguf(bank, [args.vector], cv_path, scale=s)
                with torch.no_grad(), bank[args.vector].apply(lm, scale=s):
                    hf = lm.model(ids).logits[0].double().numpy()
                ll = llama_logits(llm, llama_cpp, ids[0].tolist(), cv_path, n_layer)
                d = float(np.abs(ll - hf).max())
                effect = float(np.abs(hf - hf_plain).max())
                agree = float(np.mean(ll.argmax(1) == hf.argmax(1)))
                print(f"| {p} | {s:g} | {d:.2e} | {effect:.3g} | {agree:.2f} |")
                worst = max(worst, d)
                worst_ratio = max(worst_ratio, d / effect)
        llama_logits(llm, llama_cpp, [1], None, n_layer)  # clear the control vector
    # llama.cpp and transformers already differ unsteered (kernels, float32 sums in another order);
    # the control vector passes when it adds no more than that, and the difference stays a small
    # fraction of what the vector changes (a vector at the wrong block changes logits by the effect).
    ok = worst <= 2 * worst_plain + 1e-3 and worst_ratio <= 0.01
    print(
        f"steered: worst max |Δ logit| = {worst:.2e} (unsteered {worst_plain:.2e}); worst Δ / steering effect = "
        f"{worst_ratio:.1e}; pass when steered Δ ≤ 2 × unsteered Δ + 1e-3 and Δ / effect ≤ 0.01: "
        f"{'PASS' if ok else 'FAIL'}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
