"""The next-item evaluation's report for people: a table of the methods and a chart."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def results_table(results: Mapping[str, Mapping[str, float]], k: int, default: str) -> str:
    """HR, NDCG, MRR at k and coverage per method, the default one starred."""
    lines = [
        f"{'method':<22}{'HR@' + str(k):>9}{'NDCG@' + str(k):>10}{'MRR@' + str(k):>9}{'coverage':>10}"
    ]
    for name, m in results.items():
        mark = " *" if name == default else ""
        lines.append(
            f"{name + mark:<22}{m['hr']:>9.4f}{m['ndcg']:>10.4f}{m['mrr']:>9.4f}{m['coverage']:>10.3f}"
        )
    return "\n".join(lines)


def write_chart(path: Path, report: Mapping[str, Any]) -> None:
    """A PNG of NDCG@k by method and by history length (the report's breakdown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    methods = list(report["methods"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    values = [report["methods"][m]["ndcg"] for m in methods]
    colors = ["tab:orange" if m == report["default"] else "tab:blue" for m in methods]
    ax1.bar(range(len(methods)), values, color=colors)
    ax1.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax1.set_ylabel(f"NDCG@{k}")
    ax1.set_title(f"{report.get('data', '')}: NDCG@{k} by method ({report['users']} users)")
    for x, v in enumerate(values):
        ax1.text(x, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
    by_len = report["breakdowns"]["history_length"]
    for m in methods:
        buckets = list(by_len[m])
        ax2.plot(buckets, [by_len[m][b]["ndcg"] for b in buckets], marker="o", label=m)
    ax2.set_xlabel("history length (distinct items)")
    ax2.set_ylabel(f"NDCG@{k}")
    ax2.set_title("by history length")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def breakdown_table(groups: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """NDCG per method (rows) and group (columns, e.g. history length buckets), with the
    users of each group on the first line."""
    if not groups:
        return ""
    first = next(iter(groups.values()))
    labels = list(first)
    lines = [
        f"{'users':<22}" + "".join(f"{int(first[g]['users']):>9}" for g in labels),
        f"{'method':<22}" + "".join(f"{g:>9}" for g in labels),
    ]
    for name, by_group in groups.items():
        lines.append(
            f"{name:<22}"
            + "".join(
                f"{by_group[g]['ndcg']:>9.4f}" if g in by_group else f"{'':>9}" for g in labels
            )
        )
    return "\n".join(lines)
