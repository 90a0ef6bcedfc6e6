"""Subcommands of the `vimpac` program; each module exposes `register(subparsers)`."""

from vimpac.commands import db, synth, tokenize, train_tokenizer, convert_dalle

COMMANDS = [synth.register, train_tokenizer.register, convert_dalle.register, tokenize.register, db.register]
