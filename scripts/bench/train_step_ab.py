"""Interleaved before/after runs of scripts/bench/train_step.py on a CPU, collected into one JSON.

    python scripts/bench/train_step_ab.py --before REV --after REV --rounds 5 --out benchmarks/NAME.json

Each revision is checked out into a temporary shared clone (vimpac/kernels and vimpac/tokenization linked to
../kernels and ../tokenization, as setup.py maps them) and run with PYTHONPATH pointing at it; both get this
tree's scripts/bench/train_step.py, so only the code under test differs. A shared machine's load drifts over
minutes, so the configurations run in rounds, in an order reversed every other round:

  1x2         one process with 2 threads, OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads otherwise wait out
              other processes' time slices; `1x2-spin` runs the default policy once per revision at the end)
  2x1         two concurrent 1-thread processes: the demo's 2 CPU ranks (tokens/s summed)
  *-malloc    --after only: glibc malloc keeping freed memory (no fresh, faulting pages each step)

The JSON holds every run's bench payload verbatim, the load average before each run, and per configuration the
median over rounds of tokens/s and of process CPU time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench" / "train_step.py"
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def make_tree(rev: str, dest: Path) -> str:
    """A shared clone of this repository at `rev` in `dest`, runnable by PYTHONPATH; returns the full commit."""
    subprocess.run(["git", "clone", "-q", "--shared", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", rev], check=True)
    for package in ("kernels", "tokenization"):
        (dest / "vimpac" / package).symlink_to(Path("..") / package)
    with open(dest / ".git" / "info" / "exclude", "a") as exclude:
        exclude.write("vimpac/kernels\nvimpac/tokenization\n")
    shutil.copy(BENCH, dest / "scripts" / "bench" / "train_step.py")
    return subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def start(tree: Path, threads: int, env: dict[str, str], out: Path, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, str(tree / "scripts" / "bench" / "train_step.py"), "--configs", args.config]
    command += ["--threads", str(threads), "--warmup", str(args.warmup), "--steps", str(args.steps), "--json", str(out)]
    full_env = {**os.environ, **env, "PYTHONPATH": str(tree)}
    # Run outside the repository so that the editable install's tree cannot shadow the one under test.
    return subprocess.Popen(command, env=full_env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)


def run(
    tree: Path, processes: int, threads: int, env: dict[str, str], work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """`processes` concurrent bench processes; their JSON payloads."""
    outs = [work / f"run{i}.json" for i in range(processes)]
    procs = [start(tree, threads, env, out, args) for out in outs]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a bench process failed in {tree}")
    return [json.loads(out.read_text()) for out in outs]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per configuration over rounds: tokens/s (summed over concurrent processes) and CPU s per step."""
    by_config: dict[str, list[tuple[float, float]]] = {}
    for entry in runs:
        rows = [payload["results"][0] for payload in entry["payloads"]]
        tokens = sum(r["tokens_per_s"] for r in rows)
        cpu = statistics.median(statistics.median(r["process_cpu_times_s"]) for r in rows)
        by_config.setdefault(entry["name"], []).append((tokens, cpu))
    return {
        name: {
            "rounds": len(values),
            "tokens_per_s_median": statistics.median(v[0] for v in values),
            "tokens_per_s_each": [v[0] for v in values],
            "process_cpu_s_per_step_median": statistics.median(v[1] for v in values),
        }
        for name, values in by_config.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision before the change")
    parser.add_argument("--after", required=True, help="git revision after the change")
    parser.add_argument("--config", default="demo", help="train_step.py preset (default demo)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-spin", action="store_true", help="skip the default-OpenMP-policy 1x2 runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {"before": work / "before", "after": work / "after"}
        commits = {side: make_tree(getattr(args, side), tree) for side, tree in trees.items()}
        plan = [
            ("before", "1x2", 1, 2, PASSIVE),
            ("after", "1x2", 1, 2, PASSIVE),
            ("after", "1x2-malloc", 1, 2, {**PASSIVE, **MALLOC}),
            ("before", "2x1", 2, 1, {}),
            ("after", "2x1", 2, 1, {}),
            ("after", "2x1-malloc", 2, 1, MALLOC),
        ]
        runs = []
        for round_ in range(args.rounds):
            for side, name, processes, threads, env in plan if round_ % 2 == 0 else plan[::-1]:
                load = os.getloadavg()
                payloads = run(trees[side], processes, threads, env, work, args)
                runs.append({"name": f"{side} {name}", "round": round_, "load_before": load, "payloads": payloads})
                tokens = sum(p["results"][0]["tokens_per_s"] for p in payloads)
                print(f"round {round_} {side} {name}: {tokens:.0f} tokens/s (load {load[0]:.2f})", flush=True)
        if not args.no_spin:
            for side in ("before", "after"):
                load = os.getloadavg()
                payloads = run(trees[side], 1, 2, {}, work, args)
                runs.append({"name": f"{side} 1x2-spin", "round": 0, "load_before": load, "payloads": payloads})
    summary = summarize(runs)
    for name, s in summary.items():
        print(f"{name:18s} {s['tokens_per_s_median']:9.0f} tokens/s (median of {s['rounds']})")
    payload = {
        "what": f"scripts/bench/train_step.py --configs {args.config}, before/after in interleaved rounds",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commits": commits,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
