"""Heads that map one frozen encoder layer to the shared space (docs/method.md § 3).

Every head returns L2-normalised rows. A head carries `config` (a JSON-able dict) so that
`build_head(**config)` rebuilds it before its tensors are loaded; nothing is ever pickled.
The variational wrapper (for VIB, section 3.4) returns (mu, logvar) instead, with logvar = tanh(.).
CSA is closed form: ridge-regularised CCA between the centred features of the two layers, top-k
directions, pairs scored by the correlation-weighted similarity (or, as STRUCTURE's baseline, a plain cosine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stratalign.core.baselines import BASELINE_HEADS
from stratalign.errors import StratalignError

HEAD_KINDS = ("linear", "mlp", "residual", "csa", *BASELINE_HEADS)
VIB_SCALE = 0.05  # s in z = mu + s * sigma * eps (docs/method.md § 3.4)


def _check_dims(**dims: int) -> None:
    for name, v in dims.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise StratalignError(f"head {name} must be a positive integer, not {v!r}")


def _check_dropout(p: float) -> None:
    if not 0.0 <= float(p) < 1.0:
        raise StratalignError(f"head dropout must be in [0, 1), not {p!r}")


class _Head(nn.Module):
    """A head: `features(x)` is the raw output, `forward(x)` its L2-normalised rows."""

    config: dict[str, Any]

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


class LinearHead(_Head):
    """Linear(d_in, d_out) with bias, normalised output."""

    def __init__(self, d_in: int, d_out: int = 512) -> None:
        super().__init__()
        _check_dims(d_in=d_in, d_out=d_out)
        self.linear = nn.Linear(d_in, d_out)
        self.config = {"kind": "linear", "d_in": int(d_in), "d_out": int(d_out)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class MLPHead(_Head):
    """Linear(d_in, h), then (layers-1) x [GELU, Dropout, Linear]; the last Linear maps to d_out.

    `layers` counts Linear layers, so layers=1 is Linear(d_in, d_out) and layers=2 is
    Linear(d_in, h) GELU Dropout Linear(h, d_out).
    """

    def __init__(self, d_in: int, d_out: int = 512, hidden: int = 1024, layers: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        _check_dims(d_in=d_in, d_out=d_out, hidden=hidden, layers=layers)
        _check_dropout(dropout)
        dims = [d_in] + [hidden] * (layers - 1) + [d_out]
        mods: list[nn.Module] = [nn.Linear(dims[0], dims[1])]
        for a, b in zip(dims[1:-1], dims[2:]):
            mods += [nn.GELU(), nn.Dropout(dropout), nn.Linear(a, b)]
        self.net = nn.Sequential(*mods)
        self.config = {"kind": "mlp", "d_in": int(d_in), "d_out": int(d_out), "hidden": int(hidden),
                       "layers": int(layers), "dropout": float(dropout)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualLowRankHead(_Head):
    """z = P x + g * W2 Dropout(GELU(W1 x)), normalised.

    The gate g is a learned scalar initialised at `gate_init` (default 0.1, not 0) and W2 gets the
    default (non-zero) init, so dL/dg = <dL/dz, W2 h> is non-zero from the first step and dL/dW2
    is non-zero too: the low-rank branch can actually switch on.
    """

    def __init__(self, d_in: int, d_out: int = 512, rank: int = 64, dropout: float = 0.1,
                 gate_init: float = 0.1) -> None:
        super().__init__()
        _check_dims(d_in=d_in, d_out=d_out, rank=rank)
        _check_dropout(dropout)
        self.proj = nn.Linear(d_in, d_out)
        self.down = nn.Linear(d_in, rank)
        self.up = nn.Linear(rank, d_out)
        self.drop = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.config = {"kind": "residual", "d_in": int(d_in), "d_out": int(d_out), "rank": int(rank),
                       "dropout": float(dropout), "gate_init": float(gate_init)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.gate * self.up(self.drop(F.gelu(self.down(x))))


class VariationalHead(nn.Module):
    """VIB head (section 3.4): a base head of width 2*d_out whose halves are mu and logvar = tanh(.).

    forward(x) -> (mu, logvar), both (n, d_out), mu NOT normalised (the KL uses it as is);
    `sample` gives z = normalise(mu + s * sigma * eps), s = 0.05 by default; at evaluation
    z = normalise(mu) (`embed`).
    """

    def __init__(self, base: _Head, d_out: int) -> None:
        super().__init__()
        self.base = base
        self.d_out = int(d_out)
        cfg = dict(base.config)
        cfg["d_out"] = int(d_out)
        cfg["variational"] = True
        self.config = cfg

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.base.features(x)
        mu, raw = h[..., : self.d_out], h[..., self.d_out:]
        return mu, torch.tanh(raw)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor, scale: float = VIB_SCALE,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """z = normalise(mu + scale * sigma * eps), eps ~ N(0, I); scale 0.05 by default, as the VIB
        authors' code hard-codes it (docs/method.md § 3.4)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return F.normalize(mu + scale * torch.exp(0.5 * logvar) * eps, dim=-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation embedding: normalise(mu)."""
        return F.normalize(self(x)[0], dim=-1)


CSA_SIMILARITIES = ("weighted", "cosine")
# Defaults of weighted CSA, chosen on the Twemoji pairs by validation rsum (see core.objectives): k in
# {16, 32, 64, 128, all} x ridge in {0.01, 0.1, 1, 10}; ridge 1 was best at every k (also for zero-shot), k 128
# best at 500 and 1,219 pairs (flat in k at 200). k is capped at n - 1 (and dim).
CSA_K = 128  # canonical directions kept
CSA_RIDGE = 1.0  # ridge, as a fraction of the mean feature variance
_CSA_SIDES = ("image", "text")


class CSAProjection(_Head):
    """One modality's side of CSA. Its canonical variates are u = (x - mean) @ W (k directions); W and mean
    are parameters so R_S refinement can train them; they are saved as plain tensors.

    similarity "cosine" (STRUCTURE's baseline): the embedding is normalise(u), so the dot product of two
    embeddings is the plain cosine over every kept direction.
    similarity "weighted" (the paper's weighted_corr_sim): with u^ = normalise(u) and rho the canonical
    correlations (buffer `corr`), the score of a pair is sum_i rho_i u^_i v^_i. That is the dot product of
    a = sqrt(rho) * u^ and b = sqrt(rho) * v^, whose norms (<= 1) differ from row to row. The embedding is
    [a, sqrt(1 - |a|^2), 0] on the image side and [b, 0, sqrt(1 - |b|^2)] on the text side: unit vectors
    whose cross-modal dot product is weighted_corr_sim exactly (the two padding slots are orthogonal), so
    the embed / search machinery scores pairs with the paper's similarity. d_out = k + 2 then. Dot
    products within one modality are not the paper's (it defines none): they include the padding term.
    """

    def __init__(self, d_in: int, d_out: int = 512, similarity: str = "cosine", side: str = "image") -> None:
        super().__init__()
        _check_dims(d_in=d_in, d_out=d_out)
        if similarity not in CSA_SIMILARITIES:
            raise StratalignError(f"csa similarity must be one of {CSA_SIMILARITIES}, not {similarity!r}")
        weighted = similarity == "weighted"
        if weighted and (side not in _CSA_SIDES or d_out < 3):
            raise StratalignError(f"a weighted csa head needs side image | text and d_out >= 3, got {side!r}, {d_out}")
        k = d_out - 2 if weighted else d_out
        self.mean = nn.Parameter(torch.zeros(d_in), requires_grad=False)
        self.weight = nn.Parameter(torch.zeros(d_in, k))
        self.similarity, self.side = similarity, side
        self.config = {"kind": "csa", "d_in": int(d_in), "d_out": int(d_out)}
        if weighted:  # a cosine head keeps the config (and weights) of the stores written before weighting
            self.register_buffer("corr", torch.zeros(k))
            self.config.update(similarity=similarity, side=side)

    def variates(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical variates u = (x - mean) @ W, one column per kept direction."""
        return (x - self.mean) @ self.weight

    def features(self, x: torch.Tensor) -> torch.Tensor:
        u = self.variates(x)
        if self.similarity == "cosine":
            return u
        a = F.normalize(u, dim=-1) * self.corr.clamp(0.0, 1.0).sqrt()
        pad = (1.0 - (a * a).sum(-1, keepdim=True)).clamp_min(0.0).sqrt()
        zero = torch.zeros_like(pad)
        slots = (pad, zero) if self.side == "image" else (zero, pad)
        return torch.cat([a, *slots], dim=-1)


_BUILDERS = {"linear": LinearHead, "mlp": MLPHead, "residual": ResidualLowRankHead, "csa": CSAProjection,
             **BASELINE_HEADS}


def build_head(kind: str, d_in: int, d_out: int = 512, **options: Any) -> nn.Module:
    """A fresh head from its JSON config: kind in linear | mlp | residual | csa, plus options
    (mlp: hidden, layers, dropout; residual: rank, dropout, gate_init; csa: similarity, side; asif: topk, power;
    linear, mlp, residual: variational=True)."""
    if kind not in _BUILDERS:
        raise StratalignError(f"unknown head kind {kind!r}; known: {', '.join(HEAD_KINDS)}")
    options = dict(options)
    variational = bool(options.pop("variational", False))
    if variational and (kind == "csa" or kind in BASELINE_HEADS):
        raise StratalignError(f"the {kind} head has no variational variant")
    try:
        base = _BUILDERS[kind](d_in, 2 * d_out if variational else d_out, **options)
    except TypeError as exc:
        raise StratalignError(f"bad option for head {kind!r}: {exc}") from None
    return VariationalHead(base, d_out) if variational else base


def head_config(head: nn.Module) -> dict[str, Any]:
    """The JSON config that `build_head(**config)` turns back into this head."""
    cfg = getattr(head, "config", None)
    if not isinstance(cfg, dict):
        raise StratalignError(f"{type(head).__name__} is not a stratalign head (no config)")
    return dict(cfg)


class AlignedHeads(nn.Module):
    """The two heads of one run (`image`, `text`) plus their configs."""

    def __init__(self, image: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.image = image
        self.text = text

    @property
    def variational(self) -> bool:
        return isinstance(self.image, VariationalHead)

    @property
    def config(self) -> dict[str, Any]:
        return {"type": "heads", "image": head_config(self.image), "text": head_config(self.text)}

    def head(self, modality: str) -> nn.Module:
        if modality not in ("image", "text"):
            raise StratalignError(f"modality must be image or text, not {modality!r}")
        return self.image if modality == "image" else self.text


# --------------------------------------------------------------------------- CSA


class CSA(AlignedHeads):
    """Closed-form canonical correlation heads (see `fit_csa`); `correlations` are the canonical
    correlations of the kept directions (a buffer, saved with the weights)."""

    def __init__(self, image: CSAProjection, text: CSAProjection) -> None:
        super().__init__(image, text)
        self.register_buffer("correlations", torch.zeros(image.weight.shape[1]))

    @property
    def similarity(self) -> str:
        """How a pair is scored: weighted (the paper's weighted_corr_sim) or cosine (all kept directions)."""
        return self.image.similarity

    def transform_image(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.image(torch.as_tensor(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x)

    def transform_text(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.text(torch.as_tensor(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x)


def _inv_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    w = np.clip(w, 1e-12 * max(w.max(), 1e-30), None)
    return (v / np.sqrt(w)) @ v.T


def _check_csa_pairs(a: np.ndarray, b: np.ndarray, ridge: float) -> None:
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise StratalignError(f"fit_csa needs paired 2-D arrays, got shapes {a.shape} and {b.shape}")
    if len(a) < 3:
        raise StratalignError(f"fit_csa needs at least 3 pairs, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StratalignError("fit_csa: features contain NaN or inf")
    if not ridge >= 0:
        raise StratalignError(f"fit_csa ridge must be >= 0, not {ridge}")


def _check_csa_choice(dim: int, k: int, similarity: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise StratalignError(f"fit_csa k must be an integer >= 0 (0: every direction), not {k!r}")
    if similarity not in CSA_SIMILARITIES:
        raise StratalignError(f"fit_csa similarity must be one of {CSA_SIMILARITIES}, not {similarity!r}")
    _check_dims(dim=dim)


@dataclass(frozen=True)
class CSABasis:
    """What a CSA fit computes from the pairs and the ridge alone (float64): the means, the whitening maps
    C^-1/2 and the SVD U S V^T of the whitened cross-covariance. Every k and similarity is read off one basis, so
    a grid of k values over one training set and ridge costs one decomposition (`fit_csa(basis=...)`)."""

    mean_a: np.ndarray
    mean_b: np.ndarray
    inv_a: np.ndarray
    inv_b: np.ndarray
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    n: int
    ridge: float


def csa_basis(x_img: np.ndarray, x_txt: np.ndarray, ridge: float = CSA_RIDGE) -> CSABasis:
    """The decomposition of `fit_csa` for paired rows x_img[i] <-> x_txt[i] (see there)."""
    a = np.asarray(x_img, dtype=np.float64)
    b = np.asarray(x_txt, dtype=np.float64)
    _check_csa_pairs(a, b, ridge)
    n = len(a)
    ma, mb = a.mean(0), b.mean(0)
    ac, bc = a - ma, b - mb
    caa = ac.T @ ac / (n - 1)
    cbb = bc.T @ bc / (n - 1)
    cab = ac.T @ bc / (n - 1)
    caa += (ridge * max(np.trace(caa) / len(caa), 1e-12)) * np.eye(len(caa))
    cbb += (ridge * max(np.trace(cbb) / len(cbb), 1e-12)) * np.eye(len(cbb))
    ia, ib = _inv_sqrt(caa), _inv_sqrt(cbb)
    u, s, vt = np.linalg.svd(ia @ cab @ ib, full_matrices=False)
    return CSABasis(ma, mb, ia, ib, u, s, vt, n, float(ridge))


def fit_csa(x_img: np.ndarray | None, x_txt: np.ndarray | None, dim: int = 512, ridge: float = CSA_RIDGE, *,
            k: int = CSA_K, similarity: str = "weighted", basis: CSABasis | None = None) -> CSA:
    """CSA (Li et al., ICLR 2025): ridge-regularised CCA between the centred features of the two layers,
    the top-k directions, pairs scored by `similarity` (see CSAProjection).

    C_xx + r I with r = ridge * mean variance (scale free), whitened cross-covariance
    C_xx^-1/2 C_xy C_yy^-1/2 = U S V^T (S: the canonical correlations, descending), W_x = C_xx^-1/2 U_k,
    W_y = C_yy^-1/2 V_k (float64). k = 0 keeps every direction; k is capped at min(dim, d_img, d_txt, n-1):
    CCA has no more directions than that. STRUCTURE's own CSA baseline is k=0, ridge=1e-3, cosine.
    basis: `csa_basis(x_img, x_txt, ridge)` computed before (the same numbers; x_img / x_txt are then not read).
    """
    _check_csa_choice(dim, k, similarity)
    if basis is None:
        basis = csa_basis(x_img, x_txt, ridge)  # type: ignore[arg-type]
    elif basis.ridge != float(ridge):
        raise StratalignError(f"fit_csa: the basis was computed with ridge {basis.ridge}, not {ridge}")
    da, db = len(basis.mean_a), len(basis.mean_b)
    d = int(min(k or dim, dim, da, db, basis.n - 1))
    width = d + 2 if similarity == "weighted" else d
    pi = CSAProjection(da, width, similarity, "image")
    pt = CSAProjection(db, width, similarity, "text")
    rho = torch.from_numpy(basis.s[:d]).float()
    with torch.no_grad():
        for proj, mean, w in ((pi, basis.mean_a, basis.inv_a @ basis.u[:, :d]),
                              (pt, basis.mean_b, basis.inv_b @ basis.vt[:d].T)):
            proj.mean.copy_(torch.from_numpy(mean).float())
            proj.weight.copy_(torch.from_numpy(w).float())
            if similarity == "weighted":
                proj.corr.copy_(rho)
    model = CSA(pi, pt)
    model.correlations.copy_(rho)
    return model


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model from its `config` dict: heads, CSA or CoMM."""
    kind = config.get("type")
    if kind == "heads":
        image = build_head(**config["image"])
        text = build_head(**config["text"])
        if config["image"].get("kind") == "csa":
            return CSA(image, text)
        return AlignedHeads(image, text)
    if kind == "comm":
        from stratalign.core.comm import CommModel

        return CommModel(**{"final_norm": False, **config["options"]})  # saved before the final LayerNorm: none
    raise StratalignError(f"unknown model type {kind!r} in saved config")
