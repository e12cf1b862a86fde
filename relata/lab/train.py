"""`relata train`: the workers' fit procedure (`workers.fitting.fit`) run offline, with one
more fitted part (the item adapter), and its artifacts written.

The histories are the data set's, folded as the stream processor folds them, with every
evaluation target (each user's last new positive item) and everything after it removed, so
that `relata evaluate` can score the artifacts; the fit holds each user's latest new positive
item of what remains out for validation, as it does in the recommender and in `relata
evaluate`'s default. Besides the blend weights it fits
(a) a residual linear adapter over the frozen transformer's item embeddings, trained on the
    training histories with an in-batch InfoNCE loss (the pooled, recency-weighted vector of
    a user's preceding items should point at the next item). It changes the indexed item
    vectors, so it is fitted here only, and served after `relata reindex`; the blend is
    searched over the frozen and then the adapted vectors, and the adapter kept only if it
    wins on validation;
(b) the sequence user encoder (`workers.fitting.encoder_step`, as the recommender's
    background fit trains it) within `--user-encoder-budget` seconds, kept only if its user
    vectors beat the pooled ones on validation; it is saved beside blend.json (as
    blend.json.user-encoder) and served with it.
The chosen model is validated by the live ranking core against the built-in weights on the
same targets; blend.json holds the winner (and adapter.npz the adapter, when it is part of it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from relata.lab.autofit import auto_fit
from relata.lab.protocol import prepare
from relata.lab.vectors import item_vectors
from schemas.fit_settings import FitSettings
from schemas.messages import HistoryEntry
from schemas.settings import EncoderSettings, RecommenderSettings
from workers.fitting import ItemAdapterFit, ItemStep, ModelBundle, TrainingData
from workers.fitting.bundle import user_encoder_path
from workers.ranking import BlendWeights

logger = logging.getLogger(__name__)

WINDOW = 5  # preceding items pooled into a training query


def training_pairs(
    histories: Mapping[str, Sequence[HistoryEntry]],
    rows: Mapping[str, int],
    *,
    window: int = WINDOW,
) -> tuple[np.ndarray, np.ndarray]:
    """(previous-items index matrix padded with -1, next item index) from the training
    histories, oldest first per user; positive entries only (a returned item is not a
    'next' choice; an entry is one distinct item, so repeats never make a pair)."""
    prev: list[list[int]] = []
    nxt: list[int] = []
    for history in histories.values():
        seq = [rows[e.item_id] for e in reversed(history) if e.weight > 0 and e.item_id in rows]
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


def adapter_step(
    *, epochs: int, recency: float, base_model: dict[str, str], data: str, progress: bool
) -> ItemStep:
    """The fit's item step: an adapter trained on the training histories."""

    def step(training: TrainingData) -> ItemAdapterFit:
        from workers.adapter import LinearAdapter

        prev, nxt = training_pairs(training.histories, training.items.rows)
        click.echo(f"adapter: {len(nxt)} next-item pairs, {epochs} epochs")
        weight, bias, losses = fit_adapter(
            training.items.matrix, prev, nxt, recency=recency, epochs=epochs, progress=progress
        )
        adapter = LinearAdapter(weight=weight, bias=bias)
        digest = hashlib.sha256(weight.tobytes() + bias.tobytes()).hexdigest()[:16]
        meta = {
            "kind": "residual-linear",
            "objective": "in-batch InfoNCE, pooled previous items -> next item",
            "data": data,
            "pairs": len(nxt),
            "epochs": epochs,
            "losses": losses,
            "base_model": base_model,
        }
        return ItemAdapterFit(
            matrix=adapter.apply(training.items.matrix), artifact=adapter, meta=meta, digest=digest
        )

    return step


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
    "--user-encoder-budget",
    "encoder_budget_s",
    # As the background fit's (RELATA_FIT_USER_ENCODER_BUDGET_S): about three epochs of
    # amazon-beauty's histories on two CPU cores.
    default=FitSettings().user_encoder_budget_s,
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
    help="Seed of the user encoder's fit.",
)
@click.option("--no-progress", is_flag=True, default=False, help="Hide progress bars.")
def command(
    data_dir: Path,
    out_dir: Path,
    k: int,
    epochs: int,
    encoder_budget_s: float,
    seed: int,
    no_progress: bool,
) -> None:
    """Fit the blend weights, the adapter and the sequence user encoder on histories
    (internal validation split)."""
    from workers.adapter import save_adapter
    from workers.encoder import TransformerEncoder
    from workers.fitting.encoder_step import SequenceEncoderStep

    progress = not no_progress
    started = time.perf_counter()
    prepared = prepare(data_dir, progress=progress)
    click.echo(
        f"{data_dir.name}: {len(prepared.state.profiles)} histories, "
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
    click.echo(f"prepared in {time.perf_counter() - started:.0f} s")
    start = BlendWeights()
    step = None
    if epochs > 0:
        step = adapter_step(
            epochs=epochs,
            recency=start.recency,
            base_model={"name": encoder.name, "version": encoder.version},
            data=data_dir.name,
            progress=progress,
        )
    fitted = auto_fit(
        prepared,
        base,
        current=ModelBundle(weights=start),
        k=k,
        candidates=100,
        mmr_lambda=RecommenderSettings().mmr_lambda,
        item_step=step,
        user_encoder_step=SequenceEncoderStep(
            budget_s=encoder_budget_s, seed=seed, threads=FitSettings().threads
        )
        if encoder_budget_s > 0
        else None,
        learned_ranker=FitSettings().learned_ranker,
        echo=click.echo,
        score_cases=False,
    )
    chosen = fitted.chosen
    provenance: dict[str, Any] = {
        **(chosen.weights.fitted_on or fitted.result.candidate.weights.fitted_on or {}),
        "data": data_dir.name,
        "chosen": "candidate" if fitted.result.wins() else "built-in weights",
    }
    chosen = ModelBundle(
        weights=chosen.weights.model_copy(update={"fitted_on": provenance}),
        user_encoder=chosen.user_encoder,
        item_adapter=chosen.item_adapter,
        ranker=chosen.ranker,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_path = out_dir / "adapter.npz"
    if chosen.item_adapter is not None:
        adapter = chosen.item_adapter.artifact
        save_adapter(adapter_path, adapter.weight, adapter.bias, chosen.item_adapter.meta)
    elif adapter_path.exists():
        # A stale adapter beside a blend fitted without one would be loaded by mistake.
        adapter_path.unlink()
    chosen.save(out_dir / "blend.json")
    use_adapter = chosen.item_adapter is not None
    click.echo(
        f"validation NDCG@{k}: {fitted.result.score:.4f} fitted"
        + (" with the adapter" if fitted.result.candidate.item_adapter is not None else "")
        + (" and the user encoder" if fitted.result.candidate.user_encoder is not None else "")
        + f", {fitted.result.current_score:.4f} built-in; wrote {out_dir / 'blend.json'}"
        + (f" and {adapter_path}" if use_adapter else "")
        + (f" and {user_encoder_path(out_dir / 'blend.json')}" if chosen.user_encoder else "")
        + f" (model {chosen.version})"
    )
    click.echo(f"done in {time.perf_counter() - started:.0f} s")
    click.echo(
        f"evaluate: relata evaluate --data {data_dir} --blend {out_dir / 'blend.json'}"
        + (f" --adapter {adapter_path}" if use_adapter else "")
    )
