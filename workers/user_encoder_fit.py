"""Fitting the sequence user encoder: next-item InfoNCE against the frozen item vectors.

Pure and callable from anywhere (`relata train`, an automatic refit in the workers): plain
arrays in (`SequenceSet`: history rows and the next new item of each, for training and for
validation), a fitted `UserEncoder` and a `FitReport` out; nothing is read from or written to
the world. Each training row is a history prefix and the item the user chose next; the loss
is a softmax over the item matrix rows of the batch's next items and sampled negatives (the
whole catalog where it is small), history items left out as the ranking leaves them out, with
a learned temperature. Validation (the NDCG@10 and recall@100 of the encoder's vectors, exact
search over the whole catalog) runs at fixed steps; the best state is kept, the fit stops
after `patience` validations without gain, after `max_epochs`, or when `time_budget_s` is
spent. Seeded: the same inputs, seed and thread count give the same encoder.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from workers.sequence_inputs import HistoryArrays, InputConfig
from workers.user_encoder import ModelConfig, SequenceModel, UserEncoder, batch_tensors

logger = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]


@dataclass
class SequenceSet:
    """History rows and, per row, the item (matrix row) that came next. `seen`: the items the
    ranking leaves out per row (default: the row's own history items)."""

    arrays: HistoryArrays
    targets: I64
    seen: Sequence[Sequence[int]] | None = None

    def __post_init__(self) -> None:
        if len(self.arrays) != len(self.targets):
            msg = f"{len(self.arrays)} history rows but {len(self.targets)} targets"
            raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class FitConfig:
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # Sampled negatives per step (shared by the batch), half uniform over the catalog, half
    # by the training targets' popularity; a catalog no larger is used whole.
    negatives: int = 4096
    temperature: float = 0.05  # the start of the learned temperature
    eval_every: int = 0  # steps between validations; 0: four per epoch
    # Validations without gain before stopping: two epochs (the vectors' NDCG@10 first dips
    # below pooling's while the correction is learned, then passes it).
    patience: int = 8
    max_epochs: int = 30
    # Validation rows used during the fit (a seeded sample; all when fewer).
    val_rows: int = 3000
    # What early stopping and the kept state follow: a validation figure of `validate`.
    metric: str = "ndcg"


@dataclass
class FitReport:
    """What the fit did and how well the result retrieves the validation targets."""

    parameters: int
    train_rows: int
    validation_rows: int
    steps: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    stopped: str = ""
    best_step: int = 0
    temperature: float = 0.0
    # Before any step: the untrained encoder, which is the pooled vector.
    pooled: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    fit_config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit_user_encoder(
    train: SequenceSet,
    valid: SequenceSet,
    item_matrix: np.ndarray,
    *,
    input_config: InputConfig,
    time_budget_s: float,
    seed: int = 0,
    model_config: ModelConfig | None = None,
    fit_config: FitConfig | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> tuple[UserEncoder, FitReport]:
    """Fit an encoder on `train`, stop early on `valid` (see the module docstring). The item
    matrix is the item vectors as indexed (its rows are what `arrays.items` and `targets`
    name); `input_config` is the one the arrays were built with. `threads`: torch's CPU
    threads during the fit (restored after), e.g. 1 to leave a live loop its cores."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(
            train,
            valid,
            item_matrix,
            input_config=input_config,
            time_budget_s=time_budget_s,
            seed=seed,
            model_config=model_config,
            fit_config=fit_config,
            progress=progress,
        )
    finally:
        torch.set_num_threads(before)


def _fit(
    train: SequenceSet,
    valid: SequenceSet,
    item_matrix: np.ndarray,
    *,
    input_config: InputConfig,
    time_budget_s: float,
    seed: int,
    model_config: ModelConfig | None,
    fit_config: FitConfig | None,
    progress: Callable[[str], None] | None,
) -> tuple[UserEncoder, FitReport]:
    started = time.perf_counter()
    cfg = fit_config or FitConfig()
    mcfg = model_config or ModelConfig(item_dim=int(item_matrix.shape[1]))
    if mcfg.item_dim != item_matrix.shape[1]:
        msg = f"model item_dim {mcfg.item_dim} != item matrix dim {item_matrix.shape[1]}"
        raise ValueError(msg)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device("cpu")
    matrix = torch.from_numpy(np.ascontiguousarray(item_matrix, dtype=np.float32))
    n_items = matrix.shape[0]
    model = SequenceModel(mcfg, input_config)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
    params = [*model.parameters(), log_scale]
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": [*no_decay, log_scale], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    train_rows = np.flatnonzero(train.arrays.usable())
    val = _sample(valid, cfg.val_rows, rng)
    report = FitReport(
        parameters=count_parameters(model),
        train_rows=len(train_rows),
        validation_rows=len(val),
        fit_config=asdict(cfg),
    )
    sampler = _NegativeSampler(train.targets[train_rows], n_items, cfg.negatives, seed)
    steps_per_epoch = max(1, math.ceil(len(train_rows) / cfg.batch))
    eval_every = cfg.eval_every or max(1, steps_per_epoch // 4)
    say = progress or (lambda _line: None)

    report.pooled = validate(model, val, matrix)
    best_score, best_state = report.pooled[cfg.metric], _copy_state(model)
    report.best = dict(report.pooled)
    say(
        f"user encoder: {report.parameters} parameters, {len(train_rows)} training rows, "
        f"{len(val)} validation rows; pooled NDCG@10 {report.pooled['ndcg']:.4f}"
    )
    step, since_best, report.stopped = 0, 0, "epochs"
    loss_sum, loss_n = 0.0, 0
    for _ in range(cfg.max_epochs):
        for batch_rows in _length_batches(train.arrays, train_rows, cfg.batch, rng):
            if time.perf_counter() - started > time_budget_s:
                report.stopped = "time budget"
                break
            model.train()
            loss = _step_loss(model, train, batch_rows, matrix, sampler, log_scale, device)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                log_scale.clamp_(0.0, math.log(100.0))  # temperature within [0.01, 1]
            step += 1
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            if step % eval_every:
                continue
            found = validate(model, val, matrix)
            report.losses.append((step, loss_sum / loss_n))
            loss_sum, loss_n = 0.0, 0
            report.validations.append({"step": step, **found})
            say(
                f"  step {step} (epoch {step / steps_per_epoch:.2f}): loss "
                f"{report.losses[-1][1]:.4f}, validation NDCG@10 {found['ndcg']:.4f}, "
                f"recall@100 {found['recall@100']:.4f}"
            )
            if found[cfg.metric] > best_score:
                best_score, best_state, since_best = found[cfg.metric], _copy_state(model), 0
                report.best, report.best_step = dict(found), step
                report.temperature = float(torch.exp(-log_scale.detach()))
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    report.stopped = "early stop"
                    break
        if report.stopped != "epochs":
            break
    model.load_state_dict(best_state)
    report.steps, report.epochs = step, step / steps_per_epoch
    report.seconds = time.perf_counter() - started
    logger.info(
        "user encoder fitted steps=%d stopped=%s best_step=%d ndcg=%.5f pooled=%.5f seconds=%.1f",
        step,
        report.stopped,
        report.best_step,
        report.best.get("ndcg", 0.0),
        report.pooled.get("ndcg", 0.0),
        report.seconds,
    )
    meta = {
        "objective": "next new item InfoNCE over frozen item vectors",
        "fit": {k: v for k, v in report.as_dict().items() if k not in ("losses", "validations")},
    }
    encoder = UserEncoder(model=model, model_config=mcfg, input_config=input_config, meta=meta)
    return encoder, report


def _sample(data: SequenceSet, cap: int, rng: np.random.Generator) -> SequenceSet:
    usable = np.flatnonzero(data.arrays.usable())
    if len(usable) > cap:
        usable = np.sort(rng.choice(usable, size=cap, replace=False))
    seen = None if data.seen is None else [data.seen[i] for i in usable.tolist()]
    return SequenceSet(data.arrays.take(usable), data.targets[usable], seen)


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _length_batches(
    arrays: HistoryArrays, rows: I64, batch: int, rng: np.random.Generator
) -> list[I64]:
    """Shuffled batches of rows of similar history length: within a pool of 50 batches, rows
    are sorted by length, so a batch pads to about its own width."""
    lengths = (arrays.items >= 0).sum(axis=1)
    order = rng.permutation(rows)
    pool = batch * 50
    batches: list[I64] = []
    for s in range(0, len(order), pool):
        part = order[s : s + pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[b : b + batch] for b in range(0, len(part), batch)]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


class _NegativeSampler:
    """Item rows as negatives: half uniform, half by target popularity^0.75 (word2vec's
    damping), or every row when the catalog is no larger than the sample."""

    def __init__(self, targets: I64, n_items: int, count: int, seed: int) -> None:
        self.n_items = n_items
        self.whole = count >= n_items
        counts = np.bincount(targets, minlength=n_items).astype(np.float64) ** 0.75
        p = 0.5 / n_items + 0.5 * counts / max(counts.sum(), 1e-12)
        self.p = torch.from_numpy(p / p.sum())
        self.count = count
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self) -> torch.Tensor | None:
        if self.whole:
            return None
        return torch.multinomial(self.p, self.count, replacement=True, generator=self.gen)


def _step_loss(
    model: SequenceModel,
    data: SequenceSet,
    rows: I64,
    matrix: torch.Tensor,
    sampler: _NegativeSampler,
    log_scale: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    arrays = data.arrays.take(rows)
    users = model(*batch_tensors(arrays, matrix, device))
    targets = torch.from_numpy(data.targets[rows]).long()
    history = torch.from_numpy(arrays.items).long()
    b = len(rows)
    negatives = sampler.draw()
    if negatives is None:  # the whole catalog
        candidates = torch.arange(sampler.n_items)
        labels = targets
    else:
        candidates = torch.cat([targets, negatives])
        labels = torch.arange(b)
    logits = (users @ matrix[candidates].T) * log_scale.exp()
    # Left out: the row's history items (the ranking never shows them) and copies of the
    # row's own target elsewhere among the candidates (in-batch repeats, sampled ones).
    banned = torch.zeros(b, sampler.n_items + 1, dtype=torch.bool)
    banned.scatter_(1, torch.where(history >= 0, history, sampler.n_items), True)
    mask = banned[:, candidates]
    mask |= candidates.unsqueeze(0) == targets.unsqueeze(1)
    mask[torch.arange(b), labels] = False
    logits = logits.masked_fill(mask, -1e4)
    return torch.nn.functional.cross_entropy(logits, labels)


def validate(
    model: SequenceModel, data: SequenceSet, matrix: torch.Tensor, *, chunk: int = 512
) -> dict[str, float]:
    """NDCG@10, recall@10 and recall@100 of the model's vectors: exact search over every item,
    each row's seen items left out (the protocol of `relata evaluate`'s vector hits)."""
    if not len(data):
        return {"ndcg": 0.0, "recall@10": 0.0, "recall@100": 0.0}
    model.eval()
    ranks: list[torch.Tensor] = []
    # Rows by history length: a chunk pads to its own width, not to the longest history's.
    order = np.argsort((data.arrays.items >= 0).sum(axis=1), kind="stable")
    with torch.inference_mode():
        for s in range(0, len(order), chunk):
            rows = order[s : s + chunk]
            part = data.arrays.take(rows)
            users = model(*batch_tensors(part, matrix, torch.device("cpu")))
            scores = users @ matrix.T
            seen = (
                [data.seen[i] for i in rows.tolist()]
                if data.seen is not None
                else [[i for i in row if i >= 0] for row in part.items.tolist()]
            )
            at = [(r, i) for r, items in enumerate(seen) for i in items]
            if at:
                index = torch.tensor(at, dtype=torch.long)
                scores[index[:, 0], index[:, 1]] = float("-inf")
            targets = torch.from_numpy(data.targets[rows]).long()
            own = scores[torch.arange(len(targets)), targets]
            rank = (scores > own.unsqueeze(1)).sum(1) + 1
            ranks.append(torch.where(torch.isfinite(own), rank, torch.full_like(rank, 10**9)))
    rank = torch.cat(ranks).double()
    n = len(data)
    return {
        "ndcg": float(torch.where(rank <= 10, 1.0 / torch.log2(rank + 1.0), 0.0).sum()) / n,
        "recall@10": float((rank <= 10).sum()) / n,
        "recall@100": float((rank <= 100).sum()) / n,
    }
