"""Subcommands of the `vimpac` program; each module exposes `register(subparsers)`."""

from vimpac.commands import (
    convert_dalle,
    convert_original,
    db,
    demo,
    embed,
    model_info,
    predict,
    pretrain_eval,
    probe,
    selfcheck,
    synth,
    tokenize,
    train_tokenizer,
    visualize,
)

COMMANDS = [
    demo.register,
    synth.register,
    train_tokenizer.register,
    convert_dalle.register,
    convert_original.register,
    tokenize.register,
    db.register,
    model_info.register,
    pretrain_eval.register,
    predict.register,
    embed.register,
    probe.register,
    visualize.register,
    selfcheck.register,
]
