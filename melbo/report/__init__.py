"""Reports of what a run found: completions beside the unsteered model and the random baseline
(``completions.jsonl``, ``summary.json``, ``summary.md``), KL and norm measures with plots."""
