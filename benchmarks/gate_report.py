"""The continued-pretraining gate judged on what users get: for each bench_accuracy.py run gated by
fine-tuning (`--tlnlp_args='--continued_pretraining_gate finetune'`), the test accuracy of the original
encoder's fine-tuning (the defaults), of the adapted encoder's (stage 1 always kept) and of the one the gate
kept, beside the gate's validation difference and its standard error. One run gives all three, on the same
seed and labels, so the comparison is paired.

    python benchmarks/gate_report.py --runs TAPT gate_tapt_*.json --runs "TAPT at 1e-3" gate_damage_*.json \\
        --output benchmarks/results/stage1_gate.json

Writes the JSON (with the command) and a Markdown table beside it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path


def collect(files: list[Path]) -> dict[str, list[dict]]:
    """Per set, one row per gated run (seed order), from bench_accuracy.py parts."""
    rows: dict[str, list[dict]] = {}
    for file in files:
        part = json.loads(file.read_text())
        for name, recipes in part["sets"].items():
            for result in recipes.values():
                for seed, accuracy, gate in zip(part["seeds"], result["per_seed"], result.get("stage1", [])):
                    if not gate or gate.get("gate") != "finetune":
                        continue
                    rows.setdefault(name, []).append({
                        "seed": seed, "original": gate["test_original"], "adapted": gate["test_adapted"],
                        "gated": accuracy, "kept": gate["kept"], "difference": gate["difference"],
                        "standard_error": gate["difference_standard_error"],
                        "wall_time_s": result["wall_time_s_per_seed"]})
    for runs in rows.values():
        runs.sort(key=lambda row: row["seed"])
    return rows


def summarize(rows: dict[str, list[dict]]) -> dict:
    """Means per set, and the gains over the defaults (points, paired by seed) of the adapted encoder always
    kept and of the gated one."""
    sets = {}
    for name, runs in rows.items():
        mean = {key: statistics.mean(r[key] for r in runs) for key in ("original", "adapted", "gated", "wall_time_s")}
        sets[name] = {"runs": runs, "mean": mean, "kept_adapted": sum(r["kept"] == "adapted" for r in runs),
                      "gain_always": 100 * (mean["adapted"] - mean["original"]),
                      "gain_gated": 100 * (mean["gated"] - mean["original"])}
    report = {"sets": sets}
    if sets:
        report["mean_gain_always"] = statistics.mean(s["gain_always"] for s in sets.values())
        report["mean_gain_gated"] = statistics.mean(s["gain_gated"] for s in sets.values())
    return report


def table(groups: dict[str, dict]) -> str:
    lines = ["| runs | set | seeds | defaults | stage 1 always kept | through the gate | kept adapted | "
             "gate: validation difference (standard error), points, per seed |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for group, report in groups.items():
        for name, s in report["sets"].items():
            gate = ", ".join(f"{100 * r['difference']:+.1f} ({100 * r['standard_error']:.1f})" for r in s["runs"])
            lines.append(
                f"| {group} | `{name}` | {len(s['runs'])} | {s['mean']['original']:.3f} | {s['mean']['adapted']:.3f} "
                f"({s['gain_always']:+.1f}) | {s['mean']['gated']:.3f} ({s['gain_gated']:+.1f}) | "
                f"{s['kept_adapted']} of {len(s['runs'])} | {gate} |")
        if report["sets"]:
            lines.append(f"| {group} | mean over sets | | | ({report['mean_gain_always']:+.2f}) | "
                         f"({report['mean_gain_gated']:+.2f}) | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", action="append", required=True, metavar=("NAME", "PART"),
                        help="A name for a group of runs, then bench_accuracy.py output files (repeatable).")
    parser.add_argument("--sets", help="Comma-separated sets, in the table's order (default: as the files hold them).")
    parser.add_argument("--output", type=Path, required=True, help="The JSON to write; the table goes beside it (.md).")
    args = parser.parse_args(argv)
    groups = {}
    for name, *files in args.runs:
        if not files:
            parser.error(f"--runs {name}: name the bench_accuracy.py output files after the group's name.")
        rows = collect([Path(f) for f in files])
        if args.sets:
            order = args.sets.split(",")
            rows = dict(sorted(rows.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
        groups[name] = summarize(rows)
        if not groups[name]["sets"]:
            parser.error(f"--runs {name}: none of its files holds a run gated by fine-tuning "
                         "(--tlnlp_args='--continued_pretraining_gate finetune').")
    markdown = table(groups)
    command = "python benchmarks/gate_report.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.output.write_text(json.dumps({"command": command, "groups": groups}, indent=2))
    args.output.with_suffix(".md").write_text(f"`{command}`\n\n{markdown}\n")
    print(markdown)
    return groups


if __name__ == "__main__":
    main()
