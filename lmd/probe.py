"""Linear probe: how well a frozen encoder's features of whole (unmasked) inputs separate the classes.

The paper's and MAE's measure of pre-training quality. Every patch is visible (ratio 0, as MAE
probes); the feature of an item is its final-norm CLS token concatenated with the mean of its patch
tokens. The classifier is closed-form ridge regression onto one-hot labels over standardised
features (MAE puts a non-affine BatchNorm before its linear layer for the same reason), so the
probe is deterministic and takes seconds on CPU: no SGD, no seed. The ridge strength is chosen
from a fixed grid on a fixed 20% of the probe's training items, then the probe is refit on all of
them and scored on the held-out split.

The same probe on the raw inputs (flattened pixels or latents) and on a randomly initialised
encoder are the references a learned encoder must beat (lmd.experiments.references).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmd.model import MaskedLatentTransformer, patchify

RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # lambda per item (features have unit variance)
SELECT_FRACTION = 0.2  # the last 20% of the probe's training items choose lambda


@dataclass(frozen=True)
class ProbeSet:
    """Labelled inputs for a probe: training items (fit) and held-out items (score)."""

    train: torch.Tensor  # [P, C, H, W] latents (or pixels for identity-projector stores)
    train_labels: torch.Tensor  # [P] int64
    val: torch.Tensor  # [V, C, H, W]
    val_labels: torch.Tensor  # [V] int64
    num_classes: int


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # held-out top-1
    train_accuracy: float
    ridge: float  # the chosen lambda per item
    features: int  # feature dimension


@torch.no_grad()
def encoder_features(model: MaskedLatentTransformer, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """[N, C, H, W] -> [N, 2D]: CLS and mean patch token of the encoder on all patches (float32, CPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, inputs.shape[0], batch_size):
        x = model.forward_features(patchify(inputs[i:i + batch_size].to(device), model.cfg.patch_size))
        out.append(torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=1).float().cpu())  # [n, 2D]
    model.train(was_training)
    return torch.cat(out)


def raw_features(inputs: torch.Tensor) -> torch.Tensor:
    """The reference without a model: the flattened input itself."""
    return inputs.flatten(1).float()


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).double()


def _ridge_path(x: torch.Tensor, y: torch.Tensor, lambdas: tuple[float, ...]) -> list[torch.Tensor]:
    """Ridge weights [D + 1, K] (last row: bias) for every lambda from one eigendecomposition.

    Primal form (eigh of the D x D covariance) when features are fewer than items, dual form (eigh
    of the N x N Gram matrix, W = Xc^T (Xc Xc^T + lambda n I)^-1 Yc) otherwise: the same solution,
    but raw 32 px pixels (3,072 features) on 1,000 items cost a 1,000-sized eigh, not a 3,072 one.
    """
    n, d = x.shape
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    primal = d <= n
    evals, evecs = torch.linalg.eigh(xc.T @ xc if primal else xc @ xc.T)  # [M], [M, M], M = min(D, N)
    proj = evecs.T @ (xc.T @ yc if primal else yc)  # [M, K]
    weights = []
    for lam in lambdas:
        coef = evecs @ (proj / (evals.clamp_min(0) + lam * n)[:, None])  # [M, K]
        w = coef if primal else xc.T @ coef  # [D, K]
        weights.append(torch.cat([w, (ym - xm @ w)[None]], dim=0))
    return weights


def _accuracy(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> float:
    scores = x @ w[:-1] + w[-1]
    return (scores.argmax(1) == labels).double().mean().item()


def ridge_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                num_classes: int) -> ProbeResult:
    """Fit the closed-form ridge probe on (train_x, train_y), score on (val_x, val_y). Deterministic."""
    if train_x.shape[0] < 10 or val_x.shape[0] < 1:
        raise ValueError(f"a probe needs >= 10 training and >= 1 held-out items, got {train_x.shape[0]} and "
                         f"{val_x.shape[0]}")
    train_x, val_x = train_x.double(), val_x.double()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    fit = train_x.shape[0] - max(1, int(SELECT_FRACTION * train_x.shape[0]))
    path = _ridge_path(train_x[:fit], _one_hot(train_y[:fit], num_classes), RIDGE_GRID)
    scores = [_accuracy(train_x[fit:], w, train_y[fit:]) for w in path]
    best = max(range(len(RIDGE_GRID)), key=lambda k: (scores[k], RIDGE_GRID[k]))  # ties: the stronger ridge
    (w,) = _ridge_path(train_x, _one_hot(train_y, num_classes), (RIDGE_GRID[best],))
    return ProbeResult(accuracy=_accuracy(val_x, w, val_y), train_accuracy=_accuracy(train_x, w, train_y),
                       ridge=RIDGE_GRID[best], features=train_x.shape[1])


def linear_probe(model: MaskedLatentTransformer, data: ProbeSet) -> ProbeResult:
    """The probe of a (frozen) encoder on a labelled probe set."""
    return ridge_probe(encoder_features(model, data.train), data.train_labels,
                       encoder_features(model, data.val), data.val_labels, data.num_classes)


def raw_probe(data: ProbeSet) -> ProbeResult:
    """The probe on the flattened inputs: no model at all."""
    return ridge_probe(raw_features(data.train), data.train_labels, raw_features(data.val), data.val_labels,
                       data.num_classes)
