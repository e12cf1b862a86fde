"""`relata evaluate --diversity-grid`: what MMR's lambda costs in accuracy and buys in variety.

For each lambda of a grid, the same users are ranked by the live core (`rank_users`, which
calls `workers.ranking.recommend` with `mmr_lambda`) with the hybrid method, and the report
gives NDCG@k and intra-list diversity: the mean over users of the mean pairwise cosine
distance (1 - cosine) of their top-k items' vectors (the MiniLM item vectors, the ones MMR
reads). lambda 1 is the ranking without re-ranking.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from relata.lab.eval_metrics import summarize
from relata.lab.evaluate import DEFAULT_CANDIDATES, DEFAULT_METHOD, rank_users
from relata.lab.protocol import prepare
from relata.lab.vectors import item_vectors, pooled_inputs
from schemas.settings import EncoderSettings
from workers.ranking import BlendWeights, intra_list_diversity

DEFAULT_GRID = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3)


def parse_grid(text: str) -> list[float]:
    """Comma-separated lambdas in [0, 1] (raises click.BadParameter naming the valid range)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"lambdas must be numbers in [0, 1], got {text!r}") from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise click.BadParameter(f"lambdas must be numbers in [0, 1], got {text!r}")
    return values


def diversity_grid(
    data_dir: Path,
    *,
    lambdas: Sequence[float] = DEFAULT_GRID,
    k: int = 10,
    blend_path: Path | None = None,
    encoder_settings: EncoderSettings | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    max_users: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = click.echo,
) -> dict[str, Any]:
    """NDCG@k and intra-list diversity of the hybrid ranking for each lambda."""
    from workers.encoder import TransformerEncoder

    started = time.perf_counter()
    settings = encoder_settings or EncoderSettings()
    prepared = prepare(data_dir, max_users=max_users, progress=progress)
    cases = prepared.split.cases
    weights = BlendWeights.load(blend_path) if blend_path else BlendWeights()
    encoder = TransformerEncoder.from_settings(settings.model_copy(update={"adapter_path": None}))
    matrix = item_vectors(
        prepared, encoder=encoder, cache_dir=settings.cache_dir, progress=progress
    )
    inputs = pooled_inputs(prepared, matrix, weights, top=candidates)
    rows: list[dict[str, float]] = []
    for lam in lambdas:
        result = rank_users(
            cases=cases,
            state=prepared.state,
            weights=weights,
            k=k,
            hits=inputs.hits,
            desc=f"lambda {lam}",
            progress=progress,
            user_vectors=inputs.users,
            item_vectors=inputs.items,
            mmr_lambda=lam,
        )
        spread = [intra_list_diversity(ids, inputs.items) for ids in result.lists]
        measured = [d for d in spread if d is not None]
        rows.append(
            {
                "lambda": lam,
                "ndcg": summarize(result.ranks, k=k).ndcg,
                "hr": summarize(result.ranks, k=k).hr,
                "diversity": float(np.mean(measured)) if measured else 0.0,
            }
        )
        echo(diversity_table(rows[-1:], k, header=len(rows) == 1))
    return {
        "data": data_dir.name,
        "k": k,
        "users": len(cases),
        "method": f"{DEFAULT_METHOD}{'+blend' if blend_path else ''}",
        "diversity": "mean over users of the mean pairwise cosine distance of the top-k items",
        "grid": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def diversity_table(rows: Sequence[dict[str, float]], k: int, *, header: bool = True) -> str:
    lines = [f"{'lambda':>7}{'NDCG@' + str(k):>10}{'HR@' + str(k):>9}{'diversity':>11}"]
    lines = lines if header else []
    for r in rows:
        lines.append(f"{r['lambda']:>7.2f}{r['ndcg']:>10.4f}{r['hr']:>9.4f}{r['diversity']:>11.4f}")
    return "\n".join(lines)


def write_grid_chart(path: Path, reports: Sequence[dict[str, Any]]) -> None:
    """NDCG@k against diversity, one curve per data set, each point labelled by lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4.5), squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        xs = [r["diversity"] for r in report["grid"]]
        ys = [r["ndcg"] for r in report["grid"]]
        ax.plot(xs, ys, marker="o")
        for r in report["grid"]:
            ax.annotate(f"{r['lambda']:g}", (r["diversity"], r["ndcg"]), fontsize=8)
        ax.set_xlabel("intra-list diversity (mean pairwise cosine distance)")
        ax.set_ylabel(f"NDCG@{report['k']}")
        ax.set_title(f"{report['data']}: MMR lambda ({report['users']} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
