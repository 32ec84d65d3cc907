"""PNG plots: the layer-similarity heatmap and metric-vs-pairs curves.

Built on matplotlib's object API with the Agg canvas, so no GUI backend and no pyplot global state
(safe in worker threads and headless machines).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter

from stratalign.errors import StratalignError, preview
from stratalign.report.naming import n_name


def _save(fig: Figure, path: str, dpi: int) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _pair(p: Any, shape: tuple[int, int], name: str) -> tuple[int, int] | None:
    if p is None:
        return None
    try:
        v, t = (int(x) for x in p)
    except (TypeError, ValueError):
        raise StratalignError(f"{name} must be a (vision, text) layer pair, got {p!r}") from None
    if not (-shape[0] <= v < shape[0] and -shape[1] <= t < shape[1]):
        raise StratalignError(f"{name}={p!r} is outside the {shape[0]} x {shape[1]} layer matrix")
    return v % shape[0], t % shape[1]


def layer_heatmap(matrix: Any, path: str, *, vision_names: Sequence[str] | None = None,
                  text_names: Sequence[str] | None = None, title: str = "", chosen: tuple[int, int] | None = None,
                  last: tuple[int, int] | None = None, metric: str = "similarity", annotate: bool | None = None,
                  dpi: int = 130) -> str:
    """Heatmap of an (L_vision, L_text) matrix (vision layers as rows) with the chosen and last pairs marked.

    Cells carry their value when the matrix is small enough to read (annotate=None: up to 20 x 20)."""
    mat = np.asarray(matrix, dtype=np.float64)
    if mat.ndim != 2 or mat.size == 0:
        raise StratalignError(f"heatmap matrix must be a non-empty 2-D array, got shape {mat.shape}")
    nv, nt = mat.shape
    vision_names = list(vision_names) if vision_names is not None else [str(i) for i in range(nv)]
    text_names = list(text_names) if text_names is not None else [str(i) for i in range(nt)]
    if len(vision_names) != nv or len(text_names) != nt:
        raise StratalignError(f"{len(vision_names)} vision / {len(text_names)} text names for a {nv} x {nt} matrix")
    chosen_p, last_p = _pair(chosen, mat.shape, "chosen"), _pair(last, mat.shape, "last")

    fig = Figure(figsize=(max(5.0, 0.45 * nt + 3.0), max(4.0, 0.4 * nv + 2.0)))
    ax = fig.add_subplot(1, 1, 1)
    finite = mat[np.isfinite(mat)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(mat, cmap="viridis", aspect="auto", origin="lower", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_xticks(range(nt), labels=text_names, rotation=60 if max(map(len, text_names)) > 3 else 0,
                  ha="right" if max(map(len, text_names)) > 3 else "center", fontsize=8)
    ax.set_yticks(range(nv), labels=vision_names, fontsize=8)
    ax.set_xlabel("text layer")
    ax.set_ylabel("vision layer")
    if title:
        ax.set_title(title, fontsize=10)
    if annotate is None:
        annotate = nv <= 20 and nt <= 20
    if annotate:
        mid = (vmin + vmax) / 2
        for v in range(nv):
            for t in range(nt):
                val = mat[v, t]
                ax.text(t, v, "nan" if not np.isfinite(val) else f"{val:.2f}", ha="center", va="center",
                        fontsize=6 if max(nv, nt) > 10 else 8, color="black" if val > mid else "white")
    handles = []
    if last_p is not None:
        v, t = last_p
        handles.append(ax.add_patch(Rectangle((t - 0.5, v - 0.5), 1, 1, fill=False, ec="darkorange", lw=2, ls="--",
                                              label=f"last ({vision_names[v]}, {text_names[t]}) = {mat[v, t]:.3f}")))
    if chosen_p is not None:
        v, t = chosen_p
        handles.append(ax.add_patch(Rectangle((t - 0.5, v - 0.5), 1, 1, fill=False, ec="red", lw=2.5,
                                              label=f"chosen ({vision_names[v]}, {text_names[t]}) = {mat[v, t]:.3f}")))
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18 if nt and
                  max(map(len, text_names)) > 3 else -0.12), ncol=len(handles), fontsize=8, frameon=False)
    return _save(fig, path, dpi)


def _records(data: Any) -> list[dict[str, Any]]:
    """Rows as dicts from a polars/pandas DataFrame, a list of dicts or a dict of columns."""
    if hasattr(data, "to_dicts"):  # polars
        return list(data.to_dicts())
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas
        return list(data.to_dict("records"))
    if isinstance(data, Mapping):
        cols = {k: list(v) for k, v in data.items()}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise StratalignError(f"columns have different lengths: { {k: len(v) for k, v in cols.items()} }")
        n = lengths.pop() if lengths else 0
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]
    if isinstance(data, Iterable):
        rows = list(data)
        if not all(isinstance(r, Mapping) for r in rows):
            raise StratalignError("curves() needs a DataFrame, a list of dicts or a dict of columns")
        return [dict(r) for r in rows]
    raise StratalignError(f"curves() needs a DataFrame, a list of dicts or a dict of columns, not {type(data).__name__}")


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def curves(data: Any, path: str, x: str, y: str | Sequence[str], hue: str | None = None, *, title: str = "",
           xlabel: str | None = None, ylabel: str | None = None, logx: bool | None = None, dpi: int = 130) -> str:
    """Line plot of mean +- std of each y over the rows sharing (hue, x), one panel per y column.

    For "metric vs number of training pairs per objective": x="n_pairs", y="t2i_R@1", hue="objective";
    seeds become the error bars. Rows whose x or y is missing/NaN are skipped. logx=None: log scale when x
    is positive and spans more than a factor 10."""
    ys = [y] if isinstance(y, str) else list(y)
    rows = _records(data)
    if not rows:
        raise StratalignError("curves() got no rows to plot")
    columns = set().union(*(r.keys() for r in rows))
    missing = [c for c in [x, *ys, *([hue] if hue else [])] if c not in columns]
    if missing:
        raise StratalignError(f"column(s) {preview([repr(c) for c in missing])} not in the data; "
                              f"columns: {preview(sorted(columns), 12)}")

    fig = Figure(figsize=(5.2 * len(ys), 4.0))
    axes = [fig.add_subplot(1, len(ys), i + 1) for i in range(len(ys))]
    all_x: list[float] = []
    for ax, col in zip(axes, ys):
        groups: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            xv, yv = _number(r.get(x)), _number(r.get(col))
            if xv is None or yv is None:
                continue
            groups["all" if hue is None else str(r.get(hue))][xv].append(yv)
        for name in sorted(groups):
            pts = sorted(groups[name].items())
            xs = np.array([p[0] for p in pts])
            means = np.array([np.mean(p[1]) for p in pts])
            stds = np.array([np.std(p[1], ddof=1) if len(p[1]) > 1 else 0.0 for p in pts])
            ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, lw=1.5, label=name)
            all_x.extend(xs.tolist())
        ax.set_title(col, fontsize=10)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or col)
        ax.grid(True, alpha=0.3)
    if not all_x:
        raise StratalignError(f"no row has numeric {x!r} and {preview(ys)} values to plot")
    if logx is None:
        logx = min(all_x) > 0 and max(all_x) / min(all_x) > 10
    ticks = sorted(set(all_x))
    for ax in axes:
        if logx:
            ax.set_xscale("log")
        if len(ticks) <= 12:  # label the measured x values themselves, no log minor-tick clutter
            ax.set_xticks(ticks, labels=[f"{v:g}" for v in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
    if hue is not None or len(axes) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            axes[-1].legend(handles, labels, title=hue, fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path, dpi)


# one colour per method across every report (a method keeps its colour whatever else is in the sweep)
METHOD_COLORS = {"clip / last": "#7f7f7f", "clip / chosen": "#1f77b4", "clip+structure / chosen": "#d62728",
                 "clip+structure-knn / chosen": "#ff7f0e", "clip+ib / chosen": "#2ca02c", "clip+vib / chosen": "#bcbd22",
                 "csa / chosen": "#9467bd", "comm / chosen": "#8c564b", "clip+structure / last": "#e377c2",
                 "clip+ib / last": "#98df8a", "csa / last": "#c5b0d5"}
_SPARE = ("#17becf", "#aec7e8", "#ffbb78", "#ff9896", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")


def method_color(label: str) -> str:
    """The fixed colour of a method label ('objective / layers'); unknown labels get a stable spare colour."""
    if label in METHOD_COLORS:
        return METHOD_COLORS[label]
    return _SPARE[sum(label.encode()) % len(_SPARE)]


def _n_order(values: Iterable[Any]) -> list[Any]:
    return sorted(set(values), key=lambda n: (n is None, n if n is not None else 0))


def intervals_vs_pairs(rows: Sequence[Mapping[str, Any]], path: str, metrics: Sequence[str], *, title: str = "",
                       hlines: Mapping[str, Sequence[tuple[float, str]]] | None = None, zero_line: bool = False,
                       ylabel: str = "% (test split)", dpi: int = 130) -> str:
    """One panel per metric: each method's value against the subset size (categorical: 200, 500, ..., all) with its
    95 % interval as the error bar. rows: {method, n_pairs, metric, value, low, high}. hlines: per metric, reference
    lines (value, label), e.g. chance and the majority class; zero_line for differences."""
    rows = [r for r in rows if r["metric"] in metrics]
    if not rows:
        raise StratalignError("intervals_vs_pairs() got no rows to plot")
    order = _n_order(r["n_pairs"] for r in rows)
    pos = {n: i for i, n in enumerate(order)}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(4.6 * len(metrics), 3.9))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for k, method in enumerate(methods):
            pts = sorted((pos[r["n_pairs"]], r["value"], r["low"], r["high"]) for r in rows
                         if r["method"] == method and r["metric"] == metric)
            if not pts:
                continue
            x = np.array([p[0] for p in pts]) + (k - (len(methods) - 1) / 2) * 0.08
            y = np.array([p[1] for p in pts])
            err = np.array([[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]])
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.4, label=method, color=method_color(method))
        for value, label in (hlines or {}).get(metric, ()):
            ax.axhline(value, color="black", lw=0.8, ls=":")
            ax.text(len(order) - 0.6, value, f" {label}", fontsize=7, va="bottom", ha="right")
        if zero_line:
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(range(len(order)), labels=[n_name(n) for n in order])
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("training pairs")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if i == len(metrics) - 1:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path, dpi)
