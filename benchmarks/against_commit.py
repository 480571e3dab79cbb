"""Run a benchmark script on an earlier commit and on the working tree in one session, alternating rounds, so that
"no slower than before" is measured on the same machine under the same load (these machines are noisy).

    .venv/bin/python benchmarks/against_commit.py e9c1500 --rounds 3 -- benchmarks/speed.py --steps 100
    .venv/bin/python benchmarks/against_commit.py e9c1500 --result-file-option=--out \
        benchmarks/dictionary_speed.py --rounds 5

Each side runs its own copy of the script (or, with `--script-from-working-tree`, the working tree's) with its own
`src/` first on the path (the earlier commit from a
temporary git worktree). A run's results are the JSON lines it prints or, with `--result-file-option`, the JSON
file it writes where that option says (nested objects flattened to dotted keys). Each is echoed with `commit` and
`round` added; at the end, one JSON line per setting gives the median of each numeric field over the rounds on
either side, whether they are all equal, and the ratio of the working tree's median to the earlier commit's; and
the same for the minimum (the least disturbed round, for times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def flattened(record: dict, prefix: str = "") -> dict:
    """Nested objects as dotted keys: {"relu": {"ms": 1}} → {"relu.ms": 1}."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat |= flattened(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_once(tree: Path, script: Path, arguments: list[str], result_option: str | None) -> list[dict]:
    """The results of `script` run from `tree` with `tree/src` on the path (module docstring)."""
    environment = {**os.environ, "PYTHONPATH": str(tree / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "results.json"
        extra = [result_option, str(result_file)] if result_option else []
        result = subprocess.run(
            [sys.executable, str(script), *arguments, *extra],
            cwd=tree,
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        )
        if result_option:
            data = json.loads(result_file.read_text())
            return [flattened(item) for item in (data if isinstance(data, list) else [data])]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def setting(record: dict) -> str:
    """What identifies a result: its text fields."""
    return json.dumps({k: v for k, v in record.items() if isinstance(v, str)}, sort_keys=True)


def summaries(records: list[dict], statistic: Callable[[list[float]], float]) -> dict[str, dict[str, float]]:
    """Per setting, `statistic` (median, min) of every numeric field over the rounds (null or missing values are
    skipped)."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for record in records:
        values = grouped.setdefault(setting(record), {})
        for field, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values.setdefault(field, []).append(value)
    return {key: {field: statistic(numbers) for field, numbers in values.items()} for key, values in grouped.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--result-file-option", help="the script's option naming a JSON file to write results to")
    parser.add_argument(
        "--script-from-working-tree",
        action="store_true",
        help="run the working tree's copy of the script on both sides (it must use only an API both commits have)",
    )
    parser.add_argument("script", help="the benchmark script, relative to the repository root")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="arguments of the benchmark script")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        earlier = Path(tmp) / "earlier"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(earlier), args.ref], cwd=ROOT, check=True, capture_output=True
        )
        try:
            results: dict[str, list[dict]] = {args.ref: [], "working tree": []}
            for round_ in range(args.rounds):
                for name, tree in ((args.ref, earlier), ("working tree", ROOT)):
                    script = (ROOT if args.script_from_working_tree else tree) / args.script
                    for record in run_once(tree, script, args.arguments, args.result_file_option):
                        results[name].append(record)
                        print(json.dumps({"commit": name, "round": round_, **record}), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=ROOT, check=True)
    before, after = (
        summaries(results[args.ref], statistics.median),
        summaries(results["working tree"], statistics.median),
    )
    fastest_before, fastest_after = summaries(results[args.ref], min), summaries(results["working tree"], min)
    for key, now in after.items():
        then = before.get(key, {})
        ratios = {f: round(v / then[f], 3) for f, v in now.items() if then.get(f)}
        low, low_then = fastest_after[key], fastest_before.get(key, {})
        min_ratios = {f: round(v / low_then[f], 3) for f, v in low.items() if low_then.get(f)}
        print(
            json.dumps(
                {
                    "setting": json.loads(key),
                    "equal": now == then,
                    "median_earlier": then,
                    "median_now": now,
                    "ratio_now_to_earlier": ratios,
                    "min_earlier": low_then,
                    "min_now": low,
                    "min_ratio_now_to_earlier": min_ratios,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
