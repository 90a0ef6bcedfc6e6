"""`vimpac convert-dalle ENCODER_PKL OUT`: OpenAI's DALL-E `encoder.pkl` → a dalle tokenizer directory.

The official file is a whole pickled `dall_e.encoder.Encoder` module. This is the only place in vimpac that
unpickles objects (`vimpac convert-original` unpickles an argparse.Namespace of plain values and nothing else), and
it does so with a restricted unpickler: `dall_e.*` and `torch.nn` module classes become
inert attribute holders (no code of theirs runs, and the `dall_e` package is not needed), only torch's tensor
rebuild functions and a few plain containers are allowed, and any other global (os.system, eval, …) is refused.
The tensors are then read off the object tree, checked name by name and shape by shape, renamed
(`vimpac.tokenization.dalle.official_names`) and written as config.json + model.safetensors, which load without
pickle. A plain state-dict file (`torch.save(encoder.state_dict(), ...)`) is accepted too.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import pickle
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from vimpac.errors import UsageError

EPILOG = """\
where to get encoder.pkl:
  OpenAI released the DALL-E dVAE weights with https://github.com/openai/DALL-E. Download the encoder yourself
  (vimpac never downloads anything), e.g.
      curl -LO https://cdn.openai.com/dall-e/encoder.pkl
  then convert it once:
      vimpac convert-dalle encoder.pkl tokenizers/dalle
      vimpac tokenize --tokenizer tokenizers/dalle ...
  The decoder (decoder.pkl) is not needed: VIMPAC only uses the encoder's codes.

safety:
  A .pkl file can run arbitrary code when unpickled. This command is the only step that unpickles objects
  (convert-original reads an argparse.Namespace of plain values, nothing else); it uses a restricted unpickler
  that refuses everything a DALL-E checkpoint does not need, but still: only convert a file you trust (the
  official OpenAI release). Everything after it loads safetensors.
"""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowlist (a class or function that could run code)."""


class PickledObject:
    """Inert stand-in for an instance of a pickled class: keeps the class name and the pickled state, runs no code."""

    pickled_class = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state


# Plain globals a torch-saved module legitimately references, and nothing that can act on the world.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol-2 pickles name Python 2's module
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}
# Module classes whose instances only need to be read, never run: replaced by PickledObject subclasses.
_INERT_MODULE_PREFIXES = ("dall_e.", "torch.nn.modules.")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for DALL-E checkpoints: allowlisted globals, inert stand-ins for module classes, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_INERT_MODULE_PREFIXES):
            return type(name, (PickledObject,), {"pickled_class": f"{module}.{name}"})
        raise RefusedGlobal(f"refusing to load global {module}.{name}: a DALL-E encoder checkpoint never needs it")


# What torch.load calls: `Unpickler` for the object graph and `load` for the legacy format's small headers.
_pickle_module = types.ModuleType("vimpac_restricted_pickle")
_pickle_module.Unpickler = RestrictedUnpickler
_pickle_module.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()


def read_checkpoint(path: Path) -> Any:
    """Unpickle a torch-saved file with RestrictedUnpickler onto the CPU (UsageError when it cannot be read)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file; download encoder.pkl yourself (see `vimpac convert-dalle --help`)")
    try:
        with warnings.catch_warnings():
            # Legacy (pre-1.6) files carry each module's source for a drift check that cannot apply to our inert
            # stand-ins; their warnings about it would only alarm the user.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            warnings.filterwarnings("ignore", category=torch.serialization.SourceChangeWarning)
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module)
    except RefusedGlobal as err:
        raise UsageError(f"{path}: {err}; this is not OpenAI's encoder.pkl (or it was tampered with)") from None
    except Exception as err:  # torch.load raises many types for files that are not torch checkpoints
        raise UsageError(
            f"{path} could not be read as a PyTorch checkpoint ({type(err).__name__}: {err}); "
            "expected OpenAI's DALL-E encoder.pkl or a state dict saved with torch.save"
        ) from None


def _module_tensors(obj: PickledObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Collect `obj`'s parameters and buffers under `prefix`, recursing into its submodules (like state_dict)."""
    state = obj.state if isinstance(getattr(obj, "state", None), dict) else {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for key in ("_parameters", "_buffers"):
        for name, value in (state.get(key) or {}).items():
            if value is not None and name not in skip:
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PickledObject):
            _module_tensors(child, f"{prefix}{name}.", out)


def checkpoint_tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Name → tensor from an unpickled whole module (inert tree) or a plain state dict."""
    if isinstance(obj, PickledObject):
        tensors: dict[str, torch.Tensor] = {}
        _module_tensors(obj, "", tensors)
    elif isinstance(obj, dict):
        tensors = dict(obj)
    else:
        raise UsageError(f"{path} holds a {type(obj).__name__}, not the DALL-E encoder module or its state dict")
    bad = [str(name) for name, value in tensors.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise UsageError(f"{path}: entries that are not tensors: {', '.join(bad[:5])}")
    return tensors


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" … (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def to_vimpac_state(tensors: dict[str, torch.Tensor], path: Path, what: str) -> dict[str, torch.Tensor]:
    """Official names → ours, after checking that exactly the official encoder's parameters are present."""
    from vimpac.tokenization.dalle import official_names, parameter_shapes

    names, shapes = official_names(), parameter_shapes()
    expected = {theirs: shapes[ours] for ours, theirs in names.items()}
    head = names["head.weight"]
    expected[head] = (*expected[head], 1, 1)  # the official head is a 1×1 conv
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    wrong = [
        f"{n} {tuple(tensors[n].shape)} (expected {shape})"
        for n, shape in expected.items()
        if n in tensors and tuple(tensors[n].shape) != shape
    ]
    if missing or unexpected or wrong:
        hint = (
            "this is the DALL-E decoder (decoder.pkl); convert encoder.pkl instead"
            if what == "dall_e.decoder.Decoder"
            else "expected OpenAI's DALL-E encoder.pkl (8192 codes, n_hid 256)"
        )
        parts = [f"missing {len(missing)}: {_listing(missing)}" if missing else ""]
        parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}" if unexpected else "")
        parts.append(f"wrong shape: {_listing(wrong)}" if wrong else "")
        detail = "; ".join(p for p in parts if p)
        raise UsageError(f"{path} ({what}) does not hold the DALL-E encoder's parameters — {detail}; {hint}")
    state = {ours: tensors[theirs].detach().float() for ours, theirs in names.items()}
    state["head.weight"] = state["head.weight"].flatten(1)
    return state


def convert(encoder_pkl: Path, out: Path) -> str:
    """Convert OpenAI's encoder.pkl (or an encoder state dict) into tokenizer directory `out`; returns fingerprint."""
    from vimpac.tokenization.dalle import save_dalle

    obj = read_checkpoint(encoder_pkl)
    what = obj.pickled_class if isinstance(obj, PickledObject) else "state dict"
    state = to_vimpac_state(checkpoint_tensors(obj, encoder_pkl), encoder_pkl, what)
    return save_dalle(out, state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-dalle",
        help="convert OpenAI's DALL-E encoder.pkl (downloaded by you) into a dalle tokenizer directory",
        description="Read the DALL-E dVAE encoder of the VIMPAC paper from OpenAI's encoder.pkl (a pickled "
        "module) with a restricted unpickler, check every parameter, and write OUT/config.json + "
        "OUT/model.safetensors. Besides convert-original (an argparse.Namespace only), this is the only vimpac "
        "step that unpickles; the tokenizer directory it writes loads without pickle.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("encoder_pkl", type=Path, help="path to encoder.pkl (or a state dict of the same encoder)")
    p.add_argument("out", type=Path, help="tokenizer directory to create")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it already holds files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} is not empty; choose another OUT or pass --force to overwrite it")
    if args.encoder_pkl.is_file():
        print(
            f"unpickling {args.encoder_pkl} (sha256 {_sha256(args.encoder_pkl)}) with a restricted unpickler: this "
            "unpickles objects as no other vimpac step does; only convert a file you trust (OpenAI's release)"
        )
    fp = convert(args.encoder_pkl, out)
    print(f"wrote dalle tokenizer {out} (fingerprint {fp}); use it with `vimpac tokenize --tokenizer {out} ...`")
    return 0
