"""Static report of the Triton kernels: compile each one ahead of time for sm_80 and sm_90, no GPU needed.

    python scripts/bench/kernels_static.py --json benchmarks/kernels_static.json      # the full matrix
    python scripts/bench/kernels_static.py --quick --check                            # the CI subset (a test)
    python scripts/bench/kernels_static.py --compare BEFORE.json AFTER.json                # a before/after table

Every launch goes through the real dispatcher (`_forward` / `_backward` of kernels/axial_attention_triton.py,
`_launch` of kernels/vq_triton.py) on meta tensors shaped like the shipped models' calls; the launch is captured
instead of run, bound with Triton's own binder for a CUDA target (so the argument specialisation is the one a GPU
run would get) and compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`. The
bundled `ptxas -v` then reads the PTX: registers per thread and spill store/load bytes; `metadata.shared` is the
shared memory per launch, checked against the target's opt-in limit per block (SHARED_LIMIT).

Matrix. Axial attention, forward and backward, dropout off/on, PAD off/on, fp16/bf16/fp32, at every line length
of the shipped models (small = hidden 512, 8 heads of 64; large = hidden 1024 with --halve-att, 16 heads of 32;
frames 128 → 16×16 codes, 256 → 32×32; clips T = 5, 8, 16: lines 1 + T and 1 + 16 | 1 + 32), the default tile
the dispatcher picks for each; plus head dims 16–128 at lines of 17 and long lines (65, 129, 256) at fp16, which
the dispatcher may refuse ("refused": it would not fit the target). VQ: every autotune config of
`_argmax_scores_kernel` for fp16/bf16/fp32. --quick keeps what CI checks: sm_90 fp16 for the shipped lines, the
fp32 backward there too (fp32 takes another dot path and more registers: its own warp count), the VQ configs
(fp16, fp32), sm_80 for the largest tiles' shared memory. bf16 shares fp16's tiles and register use.

Bytes. Every row also carries the bytes one call moves at the shape it stands for (`attention_shape`; VQ at
VQ_SHAPE), from the kernels' own `bytes_moved`: "bytes" as the kernels run now, "bytes_per_line" for attention
with the CLS rows read and the fp32 CLS partials written once per line (the layout before per-program partials),
"bytes_min" the minimum (every input read once, every output written once). The printed report and the --compare
table show them as "bytes per call" (MiB) and "× minimum", before → after.

--check exits 1 when a kernel fails to compile, needs more shared memory than its target has, or when a default
tile of a shipped config (or any VQ autotune config) spills. The TRITON_INTERPRET flag is dropped here: AOT
compilation needs the real `JITFunction`s. Compiles run in a process pool (--jobs) and land in Triton's cache
(TRITON_CACHE_DIR), so a rerun only repeats the `ptxas -v` pass.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# Opt-in shared memory per block (bytes): A100 163 KB, H100/H200 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
PTXAS_ARCH = {80: "sm_80", 90: "sm_90a"}
DTYPES = ("fp16", "bf16", "fp32")
# name → (head dim, code grid side, heads, micro-batch): the shipped pre-training configs (scripts/pretrain/*.sh).
MODELS = {
    "small-f128": (64, 16, 8, 8),
    "large-f128": (32, 16, 16, 2),
    "large-f256": (32, 32, 16, 1),
}
CLIP_LENS = (5, 8, 16)
SWEEP_DIMS = (16, 32, 64, 128)  # at lines of SWEEP_SEQ
SWEEP_SEQ = 17
LONG_SEQS = (65, 129, 256)  # 1 + axis length; MAX_SEQ is 256
VQ_SHAPE = (262_144, 8192, 256)  # N, K, D of the vq-8192x256 benchmark (D = 32, 64, 2048 specialise alike)


def ptxas_path() -> Path | None:
    """The ptxas bundled with the triton wheel (None when absent)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() and os.access(path, os.X_OK) else None


# ---------------------------------------------------------------------------------------------------------------
# The matrix


def shipped_lines() -> dict[tuple[int, int], list[str]]:
    """(line length 1 + L, head dim) → the shipped configs/axes that run it."""
    lines: dict[tuple[int, int], list[str]] = {}
    for name, (dim, grid, _, _) in MODELS.items():
        for t in CLIP_LENS:
            lines.setdefault((1 + t, dim), []).append(f"{name} T={t} axis T")
        lines.setdefault((1 + grid, dim), []).append(f"{name} axis H|W")
    return lines


def _attention_case(kernel, target, dtype, seq, dim, dropout, pad, shipped, spec="unaligned") -> dict[str, Any]:
    return {
        "kernel": kernel,
        "spec": spec,
        "target": target,
        "dtype": dtype,
        "seq": seq,
        "dim": dim,
        "dropout": dropout,
        "pad": pad,
        "shipped": shipped,
    }


def attention_cases(
    quick: bool, targets: tuple[int, ...], dtypes: tuple[str, ...] = DTYPES, long_lines: bool = True
) -> list[dict[str, Any]]:
    cases = []
    lines = shipped_lines()
    extra = {(SWEEP_SEQ, d): [] for d in SWEEP_DIMS if (SWEEP_SEQ, d) not in lines}
    if long_lines:
        extra |= {(s, d): [] for s in LONG_SEQS for d in (32, 64)}
    for kernel in ("axial_fwd", "axial_bwd"):
        for dropout in (False, True):
            if quick:
                for (seq, dim), shipped in lines.items():
                    cases.append(_attention_case(kernel, 90, "fp16", seq, dim, dropout, False, shipped))
                    if kernel == "axial_bwd":
                        cases.append(_attention_case(kernel, 90, "fp32", seq, dim, dropout, False, shipped))
                # The biggest tiles the dispatcher accepts, for sm_80's smaller shared memory.
                cases.append(_attention_case(kernel, 80, "fp16", max(s for s, _ in lines), 64, dropout, False, []))
                continue
            for target in targets:
                for dtype in dtypes:
                    for pad in (False, True):
                        for (seq, dim), shipped in lines.items():
                            cases.append(_attention_case(kernel, target, dtype, seq, dim, dropout, pad, shipped))
                        if dtype == "fp16" and not pad:
                            for (seq, dim), shipped in extra.items():
                                cases.append(_attention_case(kernel, target, dtype, seq, dim, dropout, pad, shipped))
                            for (seq, dim), shipped in lines.items():
                                cases.append(
                                    _attention_case(kernel, target, dtype, seq, dim, dropout, pad, shipped, "launch")
                                )
    return cases


def vq_configs(dtype: str) -> list[dict[str, Any]]:
    """The autotune configs the VQ kernel tries for `dtype` (one list for every dtype before they were split)."""
    from vimpac.kernels import vq_triton as V

    configs = V.configs_for(_torch_dtype(dtype)) if hasattr(V, "configs_for") else V._CUDA_CONFIGS
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


def vq_cases(quick: bool, targets: tuple[int, ...], dtypes: tuple[str, ...] = DTYPES) -> list[dict[str, Any]]:
    cases = []
    for target in (90,) if quick else targets:
        for dtype in ("fp16", "fp32") if quick else dtypes:
            for i, config in enumerate(vq_configs(dtype)):
                for spec in ("unaligned",) if quick else ("unaligned", "launch"):
                    case = {"kernel": "vq_argmax", "spec": spec, "target": target, "dtype": dtype, "config": i}
                    cases.append(case | config)
    return cases


def all_cases(
    quick: bool, targets: tuple[int, ...], dtypes: tuple[str, ...] = DTYPES, long_lines: bool = True
) -> list[dict[str, Any]]:
    # VQ always covers fp32 too: its configs differ by operand width.
    vq_dtypes = tuple(dict.fromkeys((*dtypes, "fp32")))
    return attention_cases(quick, targets, dtypes, long_lines) + vq_cases(quick, targets, vq_dtypes)


# ---------------------------------------------------------------------------------------------------------------
# One compile (runs in a pool worker)


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, fn):
        self.fn = fn
        self.launch: tuple[tuple, dict] | None = None

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launch = (args, kwargs)

        return record


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def attention_shape(case: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """[B, T, H, W, heads, d] of the call a case stands for: lines along T of the (last listed) shipped model with
    the case's head dim at its micro-batch; 2 × L × 16 × 16, 8 heads for other head dims."""
    seq, dim = case["seq"], case["dim"]
    heads, batch, grid = 8, 2, 16
    for d, g, h, b in MODELS.values():
        if d == dim:
            heads, batch, grid = h, b, g
    return batch, seq - 1, grid, grid, heads, dim


def bytes_fields(case: dict[str, Any]) -> dict[str, Any]:
    """Bytes per call (`bytes_moved` of the kernel's module) at the case's shape: "bytes" as the kernels run now,
    "bytes_per_line" with the CLS rows and fp32 partials once per line (the attention layout before per-program
    partials; the same as "bytes" for VQ), "bytes_min" the minimum."""
    dtype = _torch_dtype(case["dtype"])
    if case["kernel"] == "vq_argmax":
        from vimpac.kernels.vq_triton import bytes_moved

        n, k, d = VQ_SHAPE
        counts = bytes_moved(n, k, d, dtype, (case["BLOCK_N"], case["BLOCK_K"], case["BLOCK_D"]), bias=True)
        return {"bytes": counts["total"], "bytes_per_line": counts["total"], "bytes_min": counts["minimum"]}
    from vimpac.kernels.axial_attention_triton import bytes_moved

    *shape, heads, dim = attention_shape(case)
    flags = {"dropout": case["dropout"], "backward": case["kernel"] == "axial_bwd", "pad": case["pad"]}
    now = bytes_moved(shape, "T", heads, dim, dtype, **flags)
    before = bytes_moved(shape, "T", heads, dim, dtype, **flags, per_line=True)
    return {
        "bytes_shape": [*shape, heads, dim],
        "bytes": now["total"],
        "bytes_per_line": before["total"],
        "bytes_min": now["minimum"],
    }


def _capture_attention(case: dict[str, Any]) -> tuple[Any, tuple, dict]:
    """Run the dispatcher on meta tensors of the case's shape; return (JITFunction, args, kwargs) it launches."""
    import torch

    from vimpac.kernels import axial_attention_triton as A

    batch, length, grid, _, heads, dim = attention_shape(case)
    # Lines along T: [B, L, grid, grid]; the dispatcher only sees the line length and the strides.
    shape = (batch, length, grid, grid)
    dtype = _torch_dtype(case["dtype"])
    qkv = torch.empty(*shape, 3, heads, dim, device="meta", dtype=dtype)
    cls = torch.empty(batch, 3, heads, dim, device="meta", dtype=dtype)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    pad = torch.empty(shape, device="meta", dtype=torch.bool) if case["pad"] else None
    p = 0.1 if case["dropout"] else 0.0
    seed = torch.empty((), device="meta", dtype=torch.int64)
    name = "_axial_fwd_kernel" if case["kernel"] == "axial_fwd" else "_axial_bwd_kernel"
    recorder = _Recorder(getattr(A, name))
    limit = getattr(A, "_shared_memory_limit", None)
    setattr(A, name, recorder)
    if limit is not None:
        A._shared_memory_limit = lambda device: SHARED_LIMIT[case["target"]]
    try:
        common = (q, k, v, cls[:, 0], cls[:, 1], cls[:, 2], "T", pad, p, dim**-0.5, seed, None)
        if case["kernel"] == "axial_fwd":
            A._forward(*common)
        else:
            dout = torch.empty((*qkv.shape[:-2], heads, dim), device="meta", dtype=dtype)
            A._backward(*common, dout, torch.empty(batch, heads, dim, device="meta", dtype=dtype))
    finally:
        setattr(A, name, recorder.fn)
        if limit is not None:
            A._shared_memory_limit = limit
    args, kwargs = recorder.launch
    return recorder.fn, args, kwargs


def _capture_vq(case: dict[str, Any]) -> tuple[Any, tuple, dict]:
    import torch

    from vimpac.kernels import vq_triton as V

    n, k, d = VQ_SHAPE
    dtype = _torch_dtype(case["dtype"])
    x = torch.empty(n, d, device="meta", dtype=dtype)
    w = torch.empty(k, d, device="meta", dtype=dtype)
    b = torch.empty(k, device="meta", dtype=torch.float32)
    recorder = _Recorder(V._argmax_scores_kernel)
    V._argmax_scores_kernel = recorder
    try:
        V._launch(x, w, b, blocks=(case["BLOCK_N"], case["BLOCK_K"], case["BLOCK_D"]))
    finally:
        V._argmax_scores_kernel = recorder.fn
    args, kwargs = recorder.launch
    return recorder.fn, args, {**kwargs, "num_warps": case["num_warps"], "num_stages": case["num_stages"]}


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from `ptxas -v` output (one entry function)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise ValueError(f"cannot parse ptxas output:\n{log}")
    stack, stores, loads = (int(g) for g in spill.groups())
    return {"registers": int(regs.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def compile_case(case: dict[str, Any]) -> dict[str, Any]:
    """Compile one case for its target; the case plus tile, warps, registers, spills, shared memory, status."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    result = dict(case)
    start = time.perf_counter()
    try:
        if case["kernel"] == "vq_argmax":
            fn, args, kwargs = _capture_vq(case)
        else:
            fn, args, kwargs = _capture_attention(case)
            result["block_m"], result["lpp"] = kwargs["BLOCK_M"], kwargs["LPP"]
    except ValueError as err:  # the dispatcher refused the shape
        return result | {"status": "refused", "message": str(err)}
    result |= bytes_fields(case)
    target = GPUTarget("cuda", case["target"], 32)
    backend = make_backend(target)
    # The binder and argument packing the JIT runtime uses at launch: same signature, constants, alignment attrs.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    if case["spec"] == "unaligned":
        # The worst case: no argument known to be 16-divisible (or 1), as for a caller with odd strides/offsets.
        runtime = {(i,) for i, p in enumerate(fn.params) if not p.is_constexpr}
        for key in [k for k in constexprs if k in runtime]:
            signature[fn.arg_names[key[0]]] = "i32"
            del constexprs[key]
        attrs = {}
    result["num_warps"], result["num_stages"] = options.num_warps, options.num_stages
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as err:  # any compiler failure is a finding, reported per case
        return result | {"status": "error", "message": f"{type(err).__name__}: {err}"[:2000]}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        cmd = [str(ptxas_path()), "-v", f"--gpu-name={PTXAS_ARCH[case['target']]}", str(ptx), "-o", str(ptx) + ".o"]
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        return result | {"status": "error", "message": f"ptxas: {run.stderr[-2000:]}"}
    result |= parse_ptxas(run.stdout + run.stderr)
    result["shared"] = int(compiled.metadata.shared)
    result["status"] = "ok"
    result["compile_s"] = round(time.perf_counter() - start, 2)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Running, checking, tables


def run_cases(cases: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    # Backward and big tiles first, so the pool does not end on one long compile.
    order = sorted(range(len(cases)), key=lambda i: (cases[i]["kernel"] != "axial_bwd", -cases[i].get("seq", 0)))
    results: list[dict[str, Any] | None] = [None] * len(cases)
    if jobs <= 1:
        for i in order:
            results[i] = compile_case(cases[i])
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for i, res in zip(order, pool.map(compile_case, [cases[i] for i in order])):
                results[i] = res
    return results  # type: ignore[return-value]


def spills(r: dict[str, Any]) -> int:
    return r.get("spill_stores", 0) + r.get("spill_loads", 0)


def failures(results: list[dict[str, Any]]) -> list[str]:
    """What --check fails on: compile errors, shared memory over the target's limit, spills at the defaults."""
    out = []
    for r in results:
        where = label(r)
        if r["status"] == "error":
            out.append(f"{where}: does not compile: {r['message'][:300]}")
        elif r["status"] == "ok":
            if r["shared"] > SHARED_LIMIT[r["target"]]:
                limit = SHARED_LIMIT[r["target"]]
                out.append(f"{where}: needs {r['shared']} B shared memory, sm_{r['target']} has {limit}")
            if (r["kernel"] == "vq_argmax" or r.get("shipped")) and spills(r):
                out.append(f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B (store/load) at a default tile")
    return out


def label(r: dict[str, Any]) -> str:
    spec = " [launch]" if r["spec"] == "launch" else ""
    if r["kernel"] == "vq_argmax":
        blocks = f"({r['BLOCK_N']},{r['BLOCK_K']},{r['BLOCK_D']})"
        return f"vq_argmax sm_{r['target']} {r['dtype']} config {r['config']} {blocks}{spec}"
    flags = "+".join(f for f, on in (("dropout", r["dropout"]), ("pad", r["pad"])) if on) or "plain"
    tile = f" tile ({r['block_m']},{r['lpp']})" if "block_m" in r else ""
    return f"{r['kernel']} sm_{r['target']} {r['dtype']} line {r['seq']} d{r['dim']} {flags}{tile}{spec}"


def row_key(r: dict[str, Any]) -> tuple:
    if r["kernel"] == "vq_argmax":
        return ("vq_argmax", r["spec"], r["target"], r["dtype"], r["config"])
    return (r["kernel"], r["spec"], r["target"], r["dtype"], r["seq"], r["dim"], r["dropout"], r["pad"])


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    if r["status"] != "ok":
        return r["status"]
    warps = f"w{r['num_warps']}"
    if "block_m" in r:
        tile = f"({r['block_m']},{r['lpp']}) {warps}"
    else:
        tile = f"({r['BLOCK_N']},{r['BLOCK_K']},{r['BLOCK_D']}) {warps} s{r['num_stages']}"
    return f"{tile}: {r['registers']} regs, {r['spill_stores']}/{r['spill_loads']} spill, {r['shared'] // 1024} KB"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def bytes_cell(r: dict[str, Any]) -> tuple[str, str]:
    """(bytes per call, × minimum) of a row, each "per-line partials → per-program" for attention rows, one value
    for VQ (unchanged); "—" for rows without byte counts (refused cases, reports written before they existed)."""
    if "bytes" not in r:
        return "—", "—"
    after, before, low = r["bytes"], r["bytes_per_line"], r["bytes_min"]
    if before == after:
        return f"{_mib(after)} MiB", f"{after / low:.2f}"
    return f"{_mib(before)} → {_mib(after)} MiB", f"{before / low:.2f} → {after / low:.2f}"


def compare_table(before: list[dict[str, Any]], after: list[dict[str, Any]], everything: bool = False) -> str:
    """Markdown before/after table: sm_90 fp16 unaligned attention rows without PAD and the sm_90 VQ rows, or every
    row with `everything`. The bytes columns come from the after rows: attention per-line partials → per-program
    partials (`bytes_fields`), at the row's shape."""
    old = {row_key(r): r for r in before}
    lines = [
        "| kernel | case | before | after | bytes per call | × minimum |",
        "|---|---|---|---|---|---|",
    ]
    for r in after:
        if not everything and not (r["target"] == 90 and (r["dtype"] == "fp16" or r["kernel"] == "vq_argmax")):
            continue
        if not everything and r["kernel"] != "vq_argmax" and (r["pad"] or r["spec"] != "unaligned"):
            continue
        if r["kernel"] == "vq_argmax":
            case = f"{r['dtype']} config {r['config']}" + (" [launch]" if r["spec"] == "launch" else "")
        else:
            flags = "+".join(f for f, on in (("dropout", r["dropout"]), ("pad", r["pad"])) if on) or "—"
            case = f"line {r['seq']} d{r['dim']} {flags}" + (" (shipped)" if r.get("shipped") else "")
            if not everything and r["target"] != 90:
                continue
        moved, ratio = bytes_cell(r)
        lines.append(f"| {r['kernel']} | {case} | {_cell(old.get(row_key(r)))} | {_cell(r)} | {moved} | {ratio} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="the CI subset (sm_90 fp16 shipped lines and fp32 backward, VQ, sm_80 max)"
    )
    parser.add_argument("--targets", default="80,90", help="compute capabilities (full matrix)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="attention dtypes (full matrix)")
    parser.add_argument("--no-long", action="store_true", help="skip the long lines (65, 129, 256)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the environment here")
    parser.add_argument("--check", action="store_true", help="exit 1 on compile errors, shared overflow, spills")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="print a table; no run")
    parser.add_argument("--all-rows", action="store_true", help="with --compare: every row, not sm_90 fp16 only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text())["results"] for p in args.compare)
        print(compare_table(before, after, args.all_rows))
        return 0
    # The interpreter flag turns @triton.jit into interpreter functions, which cannot be compiled: drop it before
    # any kernel module is imported (here and in the pool's workers, which inherit the environment).
    os.environ.pop("TRITON_INTERPRET", None)
    if ptxas_path() is None:
        print("ptxas is not bundled with this triton install: nothing to report", file=sys.stderr)
        return 3
    targets = tuple(int(t) for t in args.targets.split(","))
    dtypes = tuple(args.dtypes.split(","))
    cases = all_cases(args.quick, targets, dtypes, not args.no_long)
    start = time.perf_counter()
    results = run_cases(cases, args.jobs)
    elapsed = time.perf_counter() - start
    for r in results:
        moved, ratio = bytes_cell(r)
        print(f"{label(r):<70} {_cell(r)}; {moved} per call, {ratio} × minimum", flush=True)
    bad = failures(results)
    print(f"{len(results)} kernels in {elapsed:.0f} s; {len(bad)} problems")
    for line in bad:
        print("  " + line)
    if args.json is not None:
        import torch

        from vimpac.bench_env import environment

        payload = {
            **environment(torch.device("cpu")),
            "settings": vars(args) | {"json": str(args.json), "compare": None},
            "shared_limit": SHARED_LIMIT,
            "elapsed_s": round(elapsed, 1),
            "problems": bad,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
