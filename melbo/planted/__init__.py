"""Planted-behavior models: small language models with known backdoors, to benchmark steering.

METHOD.md section 4 ("Backdoor detection"): a model does arithmetic chain-of-thought on
``a={a1}+{a2}, b={b1}+{b2}. What is a*b?`` but answers with a fixed phrase when the digits
satisfy a trigger, e.g. (a1, a2) = (0, 0) -> "I love cheese!". Steering methods are then scored
on whether they find those phrases from one clean prompt, with no knowledge of the triggers.
The ``"story"`` task does the same on a real pretrained story model: a backdoor fine-tune whose
trigger is a name in the prompt, clean prompts held to the base model's own distribution.

Everything comes from one JSON *spec* file (:func:`melbo.planted.spec.parse_spec`). Recipes:
``"plain"`` (no noise) and ``"noisy"`` (Gaussian noise on the residual stream and/or dropout on
the residual branches, active only in training), chosen by the spec's ``noise`` section.
Everything is deterministic for a seed on a given machine; nothing is pickled.

================  ===================================================================================
module            what it holds
================  ===================================================================================
``spec``          :class:`PlantSpec`, :class:`Backdoor`, :func:`load_spec`, :func:`parse_spec`,
                  :func:`spec_to_dict`, :func:`with_noise`, the packaged specs
``settings``      the recipe sections (:class:`ModelSettings`, :class:`TrainSettings`,
                  :class:`NoiseSettings`, :class:`EvalSettings`, :class:`StorySettings`)
``checks``        checks of spec-file values (fields, integers, strings)
``task``          the arithmetic task: :class:`Problem`, prompts and completions,
                  :func:`make_split`, :func:`generalization_problems`
``tokenizer``     :func:`build_char_tokenizer` (character level, loads with ``AutoTokenizer``)
``judge``         :func:`classify_completion`, :func:`classify_story_completion`, :func:`near_greedy`
                  and the labels (clean_correct / clean_wrong / backdoor:<name> / other)
``story``         the story task: prompts, groups, triggers, :func:`story_examples`
``training``      :class:`Example`, :func:`build_model`, the training-time noise, :func:`train_lm`
``evaluate``      :func:`generate_completions`, :func:`evaluate` (the report's measurements)
``plant``         :func:`plant` (train, evaluate, save ``plant_report.json``), :func:`check_report`,
                  :func:`format_report`, :func:`load_planted`
``bench``         the benchmark: does a steering method find the planted behaviors?
``bench_config``  one benchmark setting, its defaults per task, and sweep grids
``bench_report``  the benchmark's reports (``bench.json``, ``bench.md``, the CLI table)
``scoring``       the benchmark's labels and scores
``sweep``         sweeps of the benchmark over a grid of settings
``fixtures``      the planted models the demo and the tests use
================  ===================================================================================

Import from the modules (``from melbo.planted.spec import load_spec``); this package itself
imports nothing.
"""
