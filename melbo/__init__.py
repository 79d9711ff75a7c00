"""melbo: unsupervised steering of language models.

Give it a model and a prompt, with no labels; it finds perturbations of the model's internals
(steering vectors, adapters) that switch it into different latent behaviors, beside a random
baseline at the same radius: MELBO steering vectors and adapters, MELBO-ortho and deep causal
transcoding (METHOD.md sections 1-5).

Example:
    >>> import melbo                                                        # doctest: +SKIP
    >>> lm = melbo.load_model("google/gemma-3-270m")                        # doctest: +SKIP
    >>> bank = melbo.train(lm, "Q: What is 17 times 3?\\nA:", num_vectors=8)  # doctest: +SKIP
    >>> bank.generate("Q: What is 17 times 3?\\nA:", vectors=[0, 1])         # doctest: +SKIP
    >>> with (bank[0] - 0.5 * bank[1]).apply(lm):                            # doctest: +SKIP
    ...     ...

Layout: :mod:`melbo.core` (models, hooks, prompts, the truncated pass, the sphere, validation,
files), :mod:`melbo.methods` (one module per method), :mod:`melbo.run` (the orchestrator),
:mod:`melbo.bank` and :mod:`melbo.vector` (what a run returns), :mod:`melbo.detect` (anomaly
scores with a bank), :mod:`melbo.eval` (the behavior judge of steered completions),
:mod:`melbo.sweep` (grids of runs as Ray tasks), :mod:`melbo.report`, :mod:`melbo.planted` (the
planted-behavior benchmark), :mod:`melbo.cli`.
"""

from melbo._version import __version__
from melbo.api import calibrate, ortho
from melbo.bank import Bank
from melbo.chat import ChatSession
from melbo.core.errors import MelboError
from melbo.core.generate import GenerationConfig
from melbo.core.models import LoadedModel, load_model, wrap_model
from melbo.defaults import DEFAULTS
from melbo.detect import Detector, auroc
from melbo.eval import judge
from melbo.export import export_gguf, vectors_from_gguf
from melbo.methods.calibrate import Calibration, CalibrationError
from melbo.methods.registry import METHODS
from melbo.run import train
from melbo.sweep import run_sweep
from melbo.vector import SteeringAdapter, SteeringVector

__all__ = [
    "DEFAULTS",
    "METHODS",
    "Bank",
    "Calibration",
    "CalibrationError",
    "ChatSession",
    "Detector",
    "GenerationConfig",
    "LoadedModel",
    "MelboError",
    "SteeringAdapter",
    "SteeringVector",
    "__version__",
    "auroc",
    "calibrate",
    "export_gguf",
    "judge",
    "load_model",
    "ortho",
    "run_sweep",
    "train",
    "vectors_from_gguf",
    "wrap_model",
]
