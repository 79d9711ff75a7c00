"""melbo: unsupervised steering of language models.

MELBO steering vectors and adapters, MELBO-ortho and deep causal transcoding
(see ``METHOD.md`` in the project's spec). The package is flat: one module per idea.
"""

from melbo.errors import MelboError

__version__ = "0.1.0"
__all__ = ["MelboError", "__version__"]
