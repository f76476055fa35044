"""kdspec's data layer: builtin datasets, source readers and builtin tokenizers (pure Python).

See docs/data.md for the datasets, the source-string syntax and the tokenizers.
"""

from .builtin import BUILTIN, FIELDS, builtin_vocabulary, load_builtin
from .errors import DataError
from .hmm import entropy_floor
from .sources import check_fields, load_records, parse_source
from .tokenizer import (
    BUILTIN_TOKENIZERS,
    SPECIAL_TOKENS,
    build_tokenizer,
    builtin_vocab_size,
    special_token_kwargs,
)

__all__ = [
    "BUILTIN",
    "BUILTIN_TOKENIZERS",
    "FIELDS",
    "SPECIAL_TOKENS",
    "DataError",
    "build_tokenizer",
    "builtin_vocab_size",
    "builtin_vocabulary",
    "check_fields",
    "entropy_floor",
    "load_builtin",
    "load_records",
    "parse_source",
    "special_token_kwargs",
]
