"""`relata evaluate`: offline evaluation of recommendation quality on a data set.

The command only parses options and dispatches: next-item (`relata.lab.evaluate`, report table
and chart from `relata.lab.report`) or basket completion (`relata.lab.evaluate_basket`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from relata.lab.evaluate import DEFAULT_CANDIDATES, evaluate
from relata.lab.report import write_chart


@click.command(name="evaluate")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="RELATA_EVAL_DATA",
    show_envvar=True,
    help="Data set directory (items/events .jsonl.gz).",
)
@click.option(
    "--k",
    default=10,
    show_default=True,
    type=click.IntRange(1, 1000),
    envvar="RELATA_EVAL_K",
    show_envvar=True,
    help="Cut-off of HR/NDCG/MRR.",
)
@click.option(
    "--methods",
    default=None,
    envvar="RELATA_EVAL_METHODS",
    show_envvar=True,
    help="Comma-separated subset; default: every baseline, behaviour, hybrid (+adapter ones).",
)
@click.option(
    "--task",
    type=click.Choice(["next-item", "basket"]),
    default="next-item",
    show_default=True,
    envvar="RELATA_EVAL_TASK",
    show_envvar=True,
    help="next-item (this module) or basket completion.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="RELATA_EVAL_JSON",
    show_envvar=True,
    help="Write the report here (and a PNG beside it).",
)
@click.option(
    "--adapter",
    "adapter_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="RELATA_EVAL_ADAPTER",
    show_envvar=True,
    help="Adapter artifact (relata train).",
)
@click.option(
    "--blend",
    "blend_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="RELATA_EVAL_BLEND",
    show_envvar=True,
    help="Blend weights (relata train).",
)
@click.option(
    "--user-encoder",
    "user_encoder_path",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    envvar="RELATA_EVAL_USER_ENCODER",
    show_envvar=True,
    help="Sequence user encoder directory (relata train's blend.json.user-encoder): adds the sequence and "
    "hybrid+sequence methods (with --adapter: the adapter it was fitted with).",
)
@click.option(
    "--candidates",
    default=DEFAULT_CANDIDATES,
    show_default=True,
    type=click.IntRange(1, 10000),
    envvar="RELATA_EVAL_CANDIDATES",
    show_envvar=True,
    help="Vector-search candidates per user.",
)
@click.option(
    "--max-users",
    default=None,
    type=click.IntRange(1),
    envvar="RELATA_EVAL_MAX_USERS",
    show_envvar=True,
    help="Evaluate a seeded random sample of users (quick runs).",
)
@click.option(
    "--diversity-grid",
    "diversity_grid_text",
    default=None,
    envvar="RELATA_EVAL_DIVERSITY_GRID",
    show_envvar=True,
    help="Comma-separated MMR lambdas (e.g. 1,0.9,0.7,0.5): NDCG@k and intra-list diversity of "
    "the hybrid ranking for each, instead of the methods.",
)
@click.option(
    "--mmr-lambda",
    default=None,
    type=click.FloatRange(0.0, 1.0),
    envvar="RELATA_EVAL_MMR_LAMBDA",
    show_envvar=True,
    help="Diversity re-ranking of the default method, hybrid+fit, in its fit's validation and "
    "its figure (default: RELATA_RECOMMENDER_MMR_LAMBDA, as served).",
)
@click.option("--no-progress", is_flag=True, default=False, help="Hide progress bars.")
def command(
    data_dir: Path,
    k: int,
    methods: str | None,
    task: str,
    json_out: Path | None,
    adapter_path: Path | None,
    blend_path: Path | None,
    user_encoder_path: Path | None,
    candidates: int,
    max_users: int | None,
    diversity_grid_text: str | None,
    mmr_lambda: float | None,
    no_progress: bool,
) -> None:
    """Offline next-item evaluation (leave-one-out, full ranking) with the live ranking code."""
    if diversity_grid_text is not None:
        from relata.lab.evaluate_diversity import diversity_grid, parse_grid, write_grid_chart

        grid = diversity_grid(
            data_dir,
            lambdas=parse_grid(diversity_grid_text),
            k=k,
            blend_path=blend_path,
            candidates=candidates,
            max_users=max_users,
            progress=not no_progress,
        )
        click.echo(f"{grid['seconds']} s")
        if json_out is not None:
            _write_report(json_out, grid, lambda png: write_grid_chart(png, [grid]))
        return
    if task == "basket":
        from relata.lab.evaluate_basket import run_basket

        run_basket(data_dir=data_dir, k=k, json_out=json_out)
        return
    report = evaluate(
        data_dir,
        k=k,
        methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
        adapter_path=adapter_path,
        blend_path=blend_path,
        user_encoder_path=user_encoder_path,
        candidates=candidates,
        max_users=max_users,
        progress=not no_progress,
        mmr_lambda=mmr_lambda,
    )
    click.echo(f"default method: {report['default']}; {report['seconds']} s")
    if json_out is not None:
        _write_report(json_out, report, lambda png: write_chart(png, report))


def _write_report(json_out: Path, report: dict[str, Any], chart: Callable[[Path], None]) -> None:
    """The report as JSON at `json_out` and its chart beside it (same name, .png)."""
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    png = json_out.with_suffix(".png")
    chart(png)
    click.echo(f"wrote {json_out} and {png}")
