"""The spec's tokenizer as a transformers tokenizer (so it is saved beside every model)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def load_tokenizer(name: str, *, spec_dir: Path, work_dir: Path) -> PreTrainedTokenizerBase:
    """`builtin:words` / `builtin:bytes` are built (deterministically) into `work_dir`; `hf:ID`
    loads a hub tokenizer (where the machine has a hub); anything else is a local tokenizer
    folder, relative to the spec file. A tokenizer without a pad token pads with its eos."""
    if name.startswith("builtin:"):
        tokenizer = _builtin(name, work_dir)
    elif name.startswith("hf:"):
        tokenizer = AutoTokenizer.from_pretrained(name.removeprefix("hf:"))
    else:
        folder = (spec_dir / name).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {name!r} has no eos token; kdspec separates documents with it")
    return tokenizer


def _builtin(name: str, work_dir: Path) -> PreTrainedTokenizerFast:
    from kdspec.data.tokenizer import build_tokenizer, special_token_kwargs

    path = build_tokenizer(name, work_dir)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **special_token_kwargs(path.parent))
