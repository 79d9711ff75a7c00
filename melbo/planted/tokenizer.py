"""The character-level tokenizer of the arithmetic task's planted models (METHOD.md section 4).

One token per character: the model sees every digit on its own, so the chain-of-thought it
learns is an exact computation and a backdoor phrase is a fixed string of ids.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARSET = tuple(chr(i) for i in range(32, 127)) + ("\n",)  # printable ASCII and newline


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast``: ids 0-3 are <pad>, <s>, </s>, <unk>, then
    one id per printable ASCII character and newline (100 ids in all). Encoding prepends <s>;
    padding is on the left (for batched generation). ``save_pretrained`` writes ``tokenizer.json``
    and ``tokenizer_config.json`` (class ``TokenizersBackend``), which
    ``AutoTokenizer.from_pretrained(folder)`` loads with no custom code."""
    vocab = {token: i for i, token in enumerate((PAD, BOS, EOS, UNK) + CHARSET)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r".|\n"), behavior="isolated")  # one piece per char
    core.decoder = decoders.Fuse()  # join characters back with nothing in between
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )
