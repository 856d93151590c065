"""Passkey retrieval against the KV budget, every eviction policy: accuracy at 10-90% of the prompt kept.

    python benchmarks/kv_budget_sweep.py [--budgets 0.1,0.25,0.5,0.9] [--lengths 512,1024,2048] --plot sweep.png
    python benchmarks/kv_budget_sweep.py --from-json passkey.json --plot sweep.png   # a `tokenmill eval passkey
                                                                                     # --output-json` run
    python benchmarks/kv_budget_sweep.py --kvpress-json kvpress.json --plot sweep.png  # both engines, from a
        # `kvpress_compare.py --budgets 0.1,0.25,0.5,0.9 --output-json` run (kvpress's presses dashed)

One passkey grid (raw prompts, 5 depths per length) per mode through the quality harness: the full cache,
then `snapkv:budget=B`, `h2o:budget=B` and `streaming:budget=B` (4 sinks + the newest tokens) for each B.
Prints a Markdown table (policy x budget) and draws accuracy against the budget, one line per policy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

POLICIES = ("snapkv", "h2o", "streaming")


def accuracies(results: list[dict]) -> tuple[float, dict[str, dict[float, tuple[int, int]]]]:
    """The full cache's accuracy and, per policy and budget, (correct, total)."""
    full = 0.0
    table: dict[str, dict[float, tuple[int, int]]] = {p: {} for p in POLICIES}
    for r in results:
        correct = sum(s["correct"] for s in r["samples"])
        policy = r["mode"].split(":", 1)[0]
        if r["mode"] == "full":
            full = correct / len(r["samples"])
        elif policy in table:
            budget = float(r["mode"].split("budget=", 1)[1].split(",", 1)[0])
            table[policy][budget] = (correct, len(r["samples"]))
    return full, table


def kvpress_accuracies(
    path: str,
) -> tuple[float, float, dict[str, dict[float, tuple[int, int]]], dict[str, dict[float, tuple[int, int]]]]:
    """From a kvpress_compare.py JSON (the same prompts through both engines): the full caches' accuracies
    (tokenmill, kvpress) and per policy and budget (correct, total) for tokenmill's default rule and for
    kvpress's press (SnapKV's kvpress-rule variant of tokenmill is left out: the plot compares defaults)."""
    rows = json.loads(Path(path).read_text())["rows"]
    ours: dict[str, dict[float, tuple[int, int]]] = {p: {} for p in POLICIES}
    theirs: dict[str, dict[float, tuple[int, int]]] = {p: {} for p in POLICIES}
    full_ours = full_theirs = 0.0
    for r in rows:
        if r["policy"] == "full":
            full_ours, full_theirs = r["tokenmill_found"] / r["prompts"], r["kvpress_found"] / r["prompts"]
        elif r["policy"] in ours and "kernel=" not in r["tokenmill_mode"]:
            ours[r["policy"]][r["budget"]] = (r["tokenmill_found"], r["prompts"])
            theirs[r["policy"]][r["budget"]] = (r["kvpress_found"], r["prompts"])
    return full_ours, full_theirs, ours, theirs


def print_table(table: dict[str, dict[float, tuple[int, int]]], label: str = "") -> None:
    budgets = sorted({b for per in table.values() for b in per})
    print("| policy | " + " | ".join(f"{b:.0%} kept" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for policy, per in table.items():
        cells = [f"{per[b][0]}/{per[b][1]}" if b in per else "-" for b in budgets]
        print(f"| {label}{policy} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.1,0.25,0.5,0.9")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--from-json", default=None)
    p.add_argument(
        "--kvpress-json", default=None, help="a kvpress_compare.py --output-json run: both engines"
    )
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    peer: dict[str, dict[float, tuple[int, int]]] = {}
    peer_full = None
    if args.kvpress_json:
        full, peer_full, table, peer = kvpress_accuracies(args.kvpress_json)
    elif args.from_json:
        results = json.loads(Path(args.from_json).read_text())["results"]
    else:
        import dataclasses

        from tokenmill.bench.retrieval import evaluate_passkey

        budgets = [float(b) for b in args.budgets.split(",")]
        modes = ["full"] + [f"{p}:budget={b}" for b in budgets for p in POLICIES]
        lengths = [int(n) for n in args.lengths.split(",")]
        results = [dataclasses.asdict(r) for r in evaluate_passkey(modes, lengths=lengths)]
    if not args.kvpress_json:
        full, table = accuracies(results)
    print_table(table, "tokenmill " if peer else "")
    print(f"| full cache | {full:.0%} at every budget |")
    if peer:
        print()
        print_table(peer, "kvpress ")
        print(f"| kvpress full cache | {peer_full:.0%} at every budget |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        colors = dict(zip(POLICIES, ("tab:blue", "tab:orange", "tab:green"), strict=True))
        for policy, per in table.items():
            xs = sorted(per)
            name = f"tokenmill {policy}" if peer else policy
            ax.plot(
                [100 * b for b in xs],
                [per[b][0] / per[b][1] for b in xs],
                marker="o",
                label=name,
                color=colors[policy],
            )
        for policy, per in peer.items():
            xs = sorted(per)
            ax.plot([100 * b for b in xs], [per[b][0] / per[b][1] for b in xs], marker="x", linestyle=":",
                    label=f"kvpress {policy}", color=colors[policy])  # fmt: skip
        ax.axhline(full, color="gray", linestyle="--", label="full cache")
        ax.set_xlabel("KV budget (% of the prompt kept)")
        ax.set_ylabel("passkey accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
        ax.set_title("passkey retrieval vs KV budget")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
