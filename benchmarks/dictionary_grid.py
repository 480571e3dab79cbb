"""Every activation function and penalty at four strengths on 512 sparse features at dictionary ratio 1 (issue #3,
criterion a): one `unmerge sweep` per family (`benchmarks/sweeps/*.yaml`, 5000 steps of batch 256 each), printed
as one Markdown table with the steps each run took.

    .venv/bin/python benchmarks/dictionary_grid.py --out runs/grid          # all nine families, 36 runs
    .venv/bin/python benchmarks/dictionary_grid.py --out runs/grid topk gated

Each family's runs, `results.md` and Pareto figures are in `OUT/<family>`; rerunning reuses finished runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unmerge import api, runs
from unmerge.config import load_yaml
from unmerge.sweep import TABLE_METRICS, SweepRow, format_number, format_value

SWEEPS = Path(__file__).parent / "sweeps"


def _row(family: str, row: SweepRow) -> str:
    config = load_yaml(row.run_dir / runs.RUN_CONFIG)
    strength = ", ".join(f"{key.rsplit('.', 1)[-1]}={format_value(value)}" for key, value in row.settings.items())
    cells = [family, strength, str(config["train"]["steps"])]
    cells += [format_number(row.metrics.get(key)) for key in TABLE_METRICS]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    families = sorted(path.stem for path in SWEEPS.glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"default: all of {', '.join(families)}")
    parser.add_argument("--out", type=Path, default=Path("runs/grid"))
    args = parser.parse_args()
    unknown = sorted(set(args.families) - set(families))
    if unknown:
        parser.error(f"no sweep {', '.join(unknown)} in {SWEEPS}; choose from {', '.join(families)}")
    lines = [
        "| family | strength | steps | " + " | ".join(TABLE_METRICS) + " |",
        "|---" * (len(TABLE_METRICS) + 3) + "|",
    ]
    for family in args.families or families:
        result = api.sweep(api.load_sweep_spec(str(SWEEPS / f"{family}.yaml")), args.out / family)
        lines += [_row(family, row) for row in result.rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
