"""Video files → VQ codes: decoding, views, tokenizers, extraction.

This folder stays `tokenization/` at the repository root but is installed and imported as
`vimpac.tokenization` (setup.py's package_dir).

`load_tokenizer` is importable from here (docs/design.md §4) but resolved lazily, so that decode workers, which import
`vimpac.tokenization.decode`, do not pay for importing torch.
"""


def __getattr__(name: str):
    if name == "load_tokenizer":
        from vimpac.tokenization.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'vimpac.tokenization' has no attribute {name!r}")
