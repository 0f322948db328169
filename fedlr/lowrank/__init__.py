"""Low-rank update codecs: pure tensor math, importable without Flower.

FedMUD (Li et al., ICML 2025, arXiv 2505.23176): model update decomposition
with block-wise Kronecker factors and aggregation-aware decomposition.
"""

from fedlr.lowrank.mud import (
    AGGREGATIONS,
    DECOMPOSITIONS,
    TARGETS,
    LayerSpec,
    MUDConv1d,
    MUDConv2d,
    MUDLayer,
    MUDLinear,
    aggregate_factors,
    aggregation_error,
    bkd_sizing,
    decompose_model,
    delta_from_factors,
    frozen_factor,
    layer_specs,
    load_model_factors,
    lowrank_rank,
    matrix_shape,
    merge_round,
    model_deltas,
    model_factors,
    mud_layers,
    reset_round,
    update_gain,
)

__all__ = [
    "AGGREGATIONS",
    "DECOMPOSITIONS",
    "TARGETS",
    "LayerSpec",
    "MUDConv1d",
    "MUDConv2d",
    "MUDLayer",
    "MUDLinear",
    "aggregate_factors",
    "aggregation_error",
    "bkd_sizing",
    "decompose_model",
    "delta_from_factors",
    "frozen_factor",
    "layer_specs",
    "load_model_factors",
    "lowrank_rank",
    "matrix_shape",
    "merge_round",
    "model_deltas",
    "model_factors",
    "mud_layers",
    "reset_round",
    "update_gain",
]
