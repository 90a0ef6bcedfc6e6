"""Test helper, run as a script in place of vimpac/pretrain.py (same flags, also under the deepspeed launcher).

It builds and resumes the run exactly as vimpac/pretrain.py does, then, instead of training, writes what the engine
holds to $RESUME_PROBE_OUTPUT (rank 0; torch.save): every parameter's full fp32 value and Adam moments, read with
DeepSpeed's public `safe_get_full_*` API under ZeRO (every rank takes part: they are collectives) and from the
module / torch optimizer at stage 0, plus the buffers, the base optimizer's step counts, the learning rates of the
param groups, the engine's step counter and the trainer's epoch position. With RESUME_PROBE_THEN_TRAIN=1 the run
then trains on as vimpac/pretrain.py would, so one launch both probes a resume and continues it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import `tests` and `vimpac` by name

from vimpac.pretrain import main
from vimpac.trainer import Trainer


def probe(trainer: Trainer) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = trainer.engine
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW under a ZeRO wrapper
    # ZeRO 1/2 link each parameter to its slice of the flat optimizer state lazily, in the first step; a checkpoint
    # loaded the ordinary way is not linked yet, so safe_get_full_optimizer_state would fail. Link it now.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    params, moments = {}, {"exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:  # stage 0: whole weights and per-parameter torch state
            params[name] = p.detach().float().cpu().clone()
            for key in moments:
                moments[key][name] = base.state[p][key].detach().cpu().clone()
        else:
            params[name] = full.detach().cpu().clone()
            for key in moments:
                moments[key][name] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    if trainer.rank == 0:
        result = {
            "params": params,
            **moments,
            "buffers": {n: b.detach().cpu().clone() for n, b in engine.module.named_buffers()},
            "optimizer_steps": sorted({float(s["step"]) for s in base.state.values() if "step" in s}),
            "lr": [float(g["lr"]) for g in base.param_groups],
            "global_steps": int(engine.global_steps),
            "epoch": trainer.epoch,
            "step_in_epoch": trainer.step_in_epoch,
        }
        torch.save(result, os.environ["RESUME_PROBE_OUTPUT"])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank leaves (and tears down its gloo threads) while another still works


if __name__ == "__main__":
    fit = Trainer.fit

    def probe_then_maybe_fit(trainer: Trainer) -> None:
        probe(trainer)
        if os.environ.get("RESUME_PROBE_THEN_TRAIN") == "1":
            fit(trainer)

    Trainer.fit = probe_then_maybe_fit
    sys.exit(main())
