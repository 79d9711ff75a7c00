"""The core of melbo: models and their blocks, hooks, prompts, the truncated pass, the sphere
and orthogonality helpers, validation and files. Nothing here knows about a particular method."""
