"""Video files → VQ codes: decoding, views, tokenizers, extraction; imported as `vimpac.tokenization`."""
