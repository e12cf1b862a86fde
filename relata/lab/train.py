"""`relata train`: fit the adaptive parts on histories only, never on evaluation targets.

Split: the evaluation target (each user's last new positive item) and everything after it are
dropped first; the user's previous new positive item becomes an internal validation target.
(a) A residual linear adapter over the frozen transformer's item embeddings, trained with an
    in-batch InfoNCE loss: the pooled (recency-weighted) vector of a user's preceding items
    should point at the next item. Only histories before the validation targets are used.
(b) Blend weights: coordinate search on the validation targets over every validation user,
    vectorised (`relata.lab.blend_search`: the core's candidate features once, weights applied
    with numpy), the result checked with the live ranking core.
(c) The sequence user encoder (`workers.user_encoder`) over the item vectors chosen in (b):
    next-item InfoNCE on history prefixes, early stopped on the validation targets, within a
    time budget; then a blend search with its user vectors. Both are written
    (`user_encoder/`, `blend-sequence.json`) with the validation verdict: whether its hybrid
    ranking beats the pooled one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import click
import numpy as np

from relata.lab.blend_search import BlendSearch, coordinate_search
from relata.lab.eval_metrics import summarize
from relata.lab.evaluate import rank_users
from relata.lab.protocol import Prepared, prepare
from relata.lab.train_sequence import SEQUENCE_BLEND, USER_ENCODER_DIR, fit_sequence, write_sequence
from relata.lab.vectors import item_vectors, pooled_inputs
from schemas import vocabulary
from schemas.settings import EncoderSettings
from workers.ranking import BlendWeights

logger = logging.getLogger(__name__)

WINDOW = 5  # preceding items pooled into a training query


def training_pairs(prepared: Prepared, *, window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """(previous-items index matrix padded with -1, next item index) from the fitted histories,
    in time order per user; positives only (returns are not a 'next' choice)."""
    pos = {i: n for n, i in enumerate(prepared.item_ids)}
    by_user: dict[str, list[int]] = {}
    for e in prepared.split.history_events:
        if e.event_type == "return":
            continue
        seq = by_user.setdefault(e.user_id, [])
        idx = pos[e.item_id]
        if idx not in seq[-window:]:
            seq.append(idx)
    prev: list[list[int]] = []
    nxt: list[int] = []
    for seq in by_user.values():
        for t in range(1, len(seq)):
            ctx = seq[max(0, t - window) : t][::-1]  # most recent first
            prev.append(ctx + [-1] * (window - len(ctx)))
            nxt.append(seq[t])
    return np.asarray(prev, dtype=np.int64).reshape(-1, window), np.asarray(nxt, dtype=np.int64)


def fit_adapter(
    matrix: np.ndarray,
    prev: np.ndarray,
    nxt: np.ndarray,
    *,
    recency: float,
    epochs: int = 3,
    batch: int = 1024,
    lr: float = 2e-3,
    temperature: float = 0.05,
    decay: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Train W (init identity) and b so that pooled adapted history vectors retrieve the next
    item among the batch's next items (InfoNCE). Returns weight, bias, loss per epoch."""
    import torch

    torch.manual_seed(seed)
    dim = matrix.shape[1]
    items = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
    delta = torch.zeros(dim, dim, requires_grad=True)
    bias = torch.zeros(dim, requires_grad=True)
    opt = torch.optim.Adam([delta, bias], lr=lr)
    steps = torch.tensor([recency**j for j in range(prev.shape[1])], dtype=torch.float32)
    prev_t = torch.from_numpy(prev)
    nxt_t = torch.from_numpy(nxt)
    eye = torch.eye(dim)
    losses: list[float] = []
    rng = np.random.default_rng(seed)
    from tqdm import tqdm

    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(nxt)))
        total, count = 0.0, 0
        starts = range(0, len(order), batch)
        for s in tqdm(starts, desc=f"adapter epoch {epoch + 1}/{epochs}", disable=not progress):
            idx = order[s : s + batch]
            p, n = prev_t[idx], nxt_t[idx]
            weight = eye + delta
            mask = (p >= 0).float() * steps
            ctx = torch.nn.functional.normalize(items[p.clamp(min=0)] @ weight.T + bias, dim=-1)
            query = torch.nn.functional.normalize((ctx * mask.unsqueeze(-1)).sum(1), dim=-1)
            target = torch.nn.functional.normalize(items[n] @ weight.T + bias, dim=-1)
            logits = query @ target.T / temperature
            # The same item twice in a batch is not a negative of itself.
            same = (n.unsqueeze(0) == n.unsqueeze(1)) & ~torch.eye(len(n), dtype=torch.bool)
            logits = logits.masked_fill(same, -1e4)
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(n)))
            loss = loss + decay * (delta.pow(2).sum() + bias.pow(2).sum())
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            opt.step()
            total += float(loss.detach()) * len(n)
            count += len(n)
        losses.append(total / max(count, 1))
        logger.info("adapter epoch=%d loss=%.4f", epoch + 1, losses[-1])
    with torch.no_grad():
        return (eye + delta).numpy().copy(), bias.detach().numpy().copy(), losses


GRID: dict[str, tuple[float, ...]] = {
    "vector": (0.0, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4),
    "next_item": (0.5, 1.0, 2.0),
    "also_bought": (0.5, 1.0, 2.0),
    "bought_together": (0.5, 1.0, 2.0),
    "also_viewed": (0.5, 1.0, 2.0),
    "popularity": (0.0, 0.01, 0.03, 0.1),
    "recency": (0.5, 0.7, 0.85),
    "sequence_recency": (0.3, 0.5, 0.7),
    "vector_sharpness": (1.0, 2.0),
    "vector_recency": (0.3, 0.5, 0.7, 0.85),
}


def fit_blend(
    prepared: Prepared,
    matrix: np.ndarray | None,
    *,
    k: int,
    start: BlendWeights,
    rounds: int = 3,
    candidates: int = 100,
    desc: str = "blend",
    progress: bool = True,
    search: BlendSearch | None = None,
    skip: Collection[str] = (),
) -> tuple[BlendWeights, float, list[dict[str, Any]]]:
    """Coordinate search over GRID maximising validation NDCG@k, vectorised (`BlendSearch`,
    which scores exactly as the ranking core does); returns the best weights, their NDCG and
    the trace (its first row: the start)."""
    cases, state = prepared.split.cases, prepared.state
    if search is None:
        search = BlendSearch(prepared, k=k, candidates=candidates, weights=start)
    # Kinds without any evidence in this data set (e.g. no sessions) are not searched.
    present: set[str] = set()
    kinds = vocabulary.relation_kinds()
    for case in cases:
        for entry in state.profiles[case.user_id][:5]:
            found = state.related.get(entry.item_id)
            if found is not None:
                present.update(kinds[code] for code in found.kinds.tolist())
    # The user vector's recency is searched on its own, so that searching `recency` (the
    # co-occurrence evidence's) does not move the vector hits.
    start = start.model_copy(update={"vector_recency": start.pool_recency})
    searched = {
        name: values
        for name, values in GRID.items()
        if not (name in vocabulary.behaviour_kinds() and name not in present)
        and not (name in ("vector", "vector_sharpness", "vector_recency") and matrix is None)
        and name not in skip
    }
    mark = time.perf_counter()
    start_score = search.ndcg(search.features(matrix, start), start)
    best, best_score, trace = coordinate_search(
        search, matrix, start=start, grid=searched, rounds=rounds
    )
    seconds = time.perf_counter() - mark
    logger.info("%s evaluations=%d ndcg=%.5f seconds=%.1f", desc, len(trace), best_score, seconds)
    click.echo(
        f"{desc}: {len(trace)} settings in {seconds:.0f} s; validation NDCG@{k} "
        f"{start_score:.4f} (start) -> {best_score:.4f}"
    )
    return best, best_score, [{"weights": "start", "ndcg": start_score}, *trace]


def core_ndcg(
    prepared: Prepared, matrix: np.ndarray | None, weights: BlendWeights, *, k: int
) -> float:
    """Validation NDCG@k of `weights` ranked by the live core itself (the search's check)."""
    vin = None
    if matrix is not None and weights.vector > 0:
        vin = pooled_inputs(prepared, matrix, weights, top=100)
    result = rank_users(
        cases=prepared.split.cases,
        state=prepared.state,
        weights=weights,
        k=k,
        hits=None if vin is None else vin.hits,
        progress=False,
        user_vectors=None if vin is None else vin.users,
        item_vectors=None if vin is None else vin.items,
    )
    return summarize(result.ranks, k=k).ndcg


def _model_dir(settings: EncoderSettings) -> Path:
    from workers.model_identity import default_model_path

    return Path(settings.model_path) if settings.model_path else default_model_path()


@click.command(name="train")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="RELATA_TRAIN_DATA",
    show_envvar=True,
    help="Data set directory.",
)
@click.option(
    "--out",
    "out_dir",
    default=Path("artifacts"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    envvar="RELATA_TRAIN_OUT",
    show_envvar=True,
    help="Where adapter.npz and blend.json are written.",
)
@click.option(
    "--k",
    default=10,
    show_default=True,
    type=click.IntRange(1, 1000),
    envvar="RELATA_TRAIN_K",
    show_envvar=True,
    help="Cut-off of the validation NDCG.",
)
@click.option(
    "--epochs",
    # On amazon-beauty (109k pairs) the loss is flat after the third epoch (6.29, 6.11, 6.08,
    # 6.08, 6.08, 6.08) and each epoch costs ~45-100 s on 2 shared cores.
    default=3,
    show_default=True,
    type=click.IntRange(0, 100),
    envvar="RELATA_TRAIN_EPOCHS",
    show_envvar=True,
    help="Adapter epochs (0: no adapter, blend over the frozen model).",
)
@click.option(
    "--max-val-users",
    default=None,
    type=click.IntRange(100),
    envvar="RELATA_TRAIN_MAX_VAL_USERS",
    show_envvar=True,
    help="Validation users sampled for the blend search (default: every one).",
)
@click.option(
    "--user-encoder-budget",
    "encoder_budget_s",
    # Two minutes: about three epochs of amazon-beauty's histories on two CPU cores;
    # online-retail's longer ones need about 360 s for one and a half (docs/benchmarks.md).
    default=120.0,
    show_default=True,
    type=click.FloatRange(0),
    envvar="RELATA_TRAIN_USER_ENCODER_BUDGET_S",
    show_envvar=True,
    help="Seconds the sequence user encoder may train (0: no encoder).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    envvar="RELATA_TRAIN_SEED",
    show_envvar=True,
    help="Seed of the adapter and user encoder fits.",
)
@click.option("--no-progress", is_flag=True, default=False, help="Hide progress bars.")
def command(
    data_dir: Path,
    out_dir: Path,
    k: int,
    epochs: int,
    max_val_users: int | None,
    encoder_budget_s: float,
    seed: int,
    no_progress: bool,
) -> None:
    """Fit the adapter, the blend weights and the sequence user encoder on histories
    (internal validation split)."""
    from workers.adapter import LinearAdapter, load_adapter, save_adapter
    from workers.encoder import TransformerEncoder
    from workers.model_identity import model_version

    progress = not no_progress
    started = time.perf_counter()
    prepared = prepare(data_dir, holdout=2, max_users=max_val_users, progress=progress)
    click.echo(
        f"{data_dir.name}: {len(prepared.split.cases)} validation users; "
        f"{len(prepared.split.history_events)} history events (evaluation targets held out)"
    )
    enc_settings = EncoderSettings()
    encoder = TransformerEncoder.from_settings(
        enc_settings.model_copy(update={"adapter_path": None})
    )
    # Frozen item vectors come from the evaluation's on-disk cache when present.
    base = item_vectors(
        prepared, encoder=encoder, cache_dir=enc_settings.cache_dir, progress=progress
    )
    timings = {"prepare": time.perf_counter() - started}
    start = BlendWeights()
    matrix = base
    adapter_path = out_dir / "adapter.npz"
    adapter_meta: dict[str, Any] | None = None
    weight = bias = None
    if epochs > 0:
        mark = time.perf_counter()
        prev, nxt = training_pairs(prepared)
        click.echo(f"adapter: {len(nxt)} next-item pairs, {epochs} epochs")
        weight, bias, losses = fit_adapter(
            base, prev, nxt, recency=start.recency, epochs=epochs, seed=seed, progress=progress
        )
        adapter_meta = {
            "kind": "residual-linear",
            "objective": "in-batch InfoNCE, pooled previous items -> next item",
            "data": data_dir.name,
            "pairs": len(nxt),
            "epochs": epochs,
            "losses": losses,
            "base_model": {"name": encoder.name, "version": encoder.version},
        }
        matrix = LinearAdapter(weight=weight, bias=bias).apply(base)
        timings["adapter"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # The association features are the same for both searches: built once.
    search = BlendSearch(prepared, k=k, candidates=100, weights=start)
    timings["features"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # One round on the frozen vectors: it only has to tell whether the adapter wins.
    base_w, base_score, _ = fit_blend(
        prepared,
        base,
        k=k,
        start=start,
        rounds=1,
        desc="blend (frozen)",
        progress=progress,
        search=search,
    )
    trace: list[dict[str, Any]] = []
    best, best_score = base_w, base_score
    if adapter_meta is not None:
        search.forget()
        best, best_score, trace = fit_blend(
            prepared,
            matrix,
            k=k,
            start=base_w,
            desc="blend (adapter)",
            progress=progress,
            search=search,
        )
    timings["blend"] = time.perf_counter() - mark
    use_adapter = adapter_meta is not None and best_score > base_score
    mark = time.perf_counter()
    chosen_score = core_ndcg(
        prepared, matrix if use_adapter else base, best if use_adapter else base_w, k=k
    )
    timings["check"] = time.perf_counter() - mark
    click.echo(f"validation NDCG@{k} of the chosen weights, ranked by the core: {chosen_score:.4f}")
    if use_adapter:
        # Written before the encoder's fit: its item vectors are named by this adapter.
        save_adapter(adapter_path, weight, bias, adapter_meta or {})
    elif adapter_path.exists():
        # A stale adapter beside a blend fitted without one would be loaded by mistake.
        adapter_path.unlink()
    chosen = best if use_adapter else base_w
    adapter = load_adapter(adapter_path) if use_adapter else None
    sequence = None
    if encoder_budget_s > 0:
        mark = time.perf_counter()
        sequence = fit_sequence(
            prepared,
            matrix if use_adapter else base,
            search=search,
            blend=fit_blend,
            start=chosen,
            start_score=best_score if use_adapter else base_score,
            k=k,
            budget_s=encoder_budget_s,
            seed=seed,
            item_vectors={
                "model": encoder.name,
                "version": model_version(_model_dir(enc_settings), adapter),
                "adapter": None if adapter is None else adapter.fingerprint,
            },
            progress=progress,
        )
        timings["user encoder"] = time.perf_counter() - mark
    write_sequence(out_dir, sequence)
    chosen = chosen.model_copy(
        update={
            "fitted_on": {
                "data": data_dir.name,
                "split": "validation = each user's second-to-last new positive item",
                "users": len(prepared.split.cases),
                "k": k,
                "ndcg_frozen": round(base_score, 5),
                "ndcg_adapter": round(best_score, 5) if adapter_meta else None,
                "adapter": use_adapter,
                "evaluations": len(trace),
                "ndcg_core": round(chosen_score, 5),
                "user_encoder": None if sequence is None else sequence.summary(),
            }
        }
    )
    chosen.save(out_dir / "blend.json")
    click.echo(
        f"validation NDCG@{k}: frozen model {base_score:.4f}"
        + (f", with adapter {best_score:.4f}" if adapter_meta else "")
        + (
            ""
            if adapter_meta is None
            else " (adapter kept)"
            if use_adapter
            else " (adapter dropped)"
        )
    )
    click.echo(f"wrote {out_dir / 'blend.json'}" + (f" and {adapter_path}" if use_adapter else ""))
    click.echo(
        f"done in {time.perf_counter() - started:.0f} s ("
        + ", ".join(f"{stage} {sec:.0f} s" for stage, sec in timings.items())
        + ")"
    )
    click.echo(
        f"evaluate: relata evaluate --data {data_dir} --blend {out_dir / 'blend.json'}"
        + (f" --adapter {adapter_path}" if use_adapter else "")
        + (
            f" --user-encoder {out_dir / USER_ENCODER_DIR}"
            f" --sequence-blend {out_dir / SEQUENCE_BLEND}"
            if sequence is not None
            else ""
        )
    )
