"""melbo: unsupervised steering of language models.

MELBO steering vectors and adapters, MELBO-ortho and deep causal transcoding
(see ``METHOD.md`` in the project's spec). The package is flat: one module per idea.
"""

__version__ = "0.1.0"

from melbo.errors import MelboError  # noqa: F401
