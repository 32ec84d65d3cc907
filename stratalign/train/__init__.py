"""Training on cached features: settings (config), the loop, fitting per objective (fit), embeddings
(inference), weights formats (checkpoint) and kNN graphs (knn). Imports only stratalign.core (+ errors,
device)."""

from stratalign.train.checkpoint import CONFIG_KEY, load_heads, model_from_tensors, model_tensors, save_heads
from stratalign.train.config import TrainConfig, TrainResult
from stratalign.train.fit import (
    RunSpec,
    fit_objective,
    fit_run,
    refine_csa,
    train_comm,
    train_csa,
    train_heads,
    train_many,
)
from stratalign.train.frozen_graphs import knn_graph, knn_graphs
from stratalign.train.heads_init import make_heads
from stratalign.train.inference import embed, embed_features, fused_features

__all__ = [
    "CONFIG_KEY", "TrainConfig", "TrainResult", "embed", "embed_features", "fit_objective", "fit_run",
    "fused_features", "knn_graph", "knn_graphs", "load_heads", "make_heads", "model_from_tensors", "model_tensors",
    "refine_csa", "RunSpec", "save_heads", "train_comm", "train_csa", "train_heads", "train_many",
]
