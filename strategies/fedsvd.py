"""FedSVD and its baselines FFA-LoRA and FedAvg-LoRA: the server side of LoRA
fine-tuning (Lee et al., *FedSVD: Adaptive Orthogonalization for Private
Federated Learning with LoRA*, NeurIPS 2025, arXiv 2505.12805;
``shared/specs/fedsvd.md`` §2, §5, §7).

Every party builds the same frozen pretrained model W₀ (``fedlr.pretrain``)
and the same A₀ from the run seed, so only adapters travel:

===============  ==================  ==========  ==================================
method           down (per client)   up          server after averaging
===============  ==================  ==========  ==================================
``fedsvd``       Â_i and B̂_i        B_k         SVD of B_{i+1}Â_i every svd_period
``ffa-lora``     B_i                 B_k         nothing: A stays A₀ everywhere
``fedavg-lora``  A_i and B_i         A_k, B_k    nothing (FedIT: Ā and B̄ separately)
===============  ==================  ==========  ==================================

FedSVD must send Â because the server re-derives it (the decentralized
variant, spec §2, is not implemented); FFA-LoRA's A never changes, and every
client already holds it.

The global arrays flowing through :meth:`FedlrStrategy.run_rounds` (and into
checkpoints) are the whole LoRA state, A and B of every adapted layer: that
is the global model, which server-side evaluation loads onto W₀
(:meth:`build_global_model`, :meth:`load_global_arrays`).

Per-round diagnostics in ``metrics.jsonl``, logged for all three methods:

``orthonormality_error``
    max over layers of ‖ÂÂᵀ − I_r‖_F for the A the server broadcasts next
    (spec §7). FedSVD: ≤ 1e-5 after each SVD step, and unchanged until the
    next one. FFA-LoRA (fixed A₀) and FedAvg-LoRA (averaged A): how far their
    A is from orthonormal, for comparison.
``reconstruction_error``
    max over layers of ‖B̂Â − B_{i+1}Â_i‖_F / ‖B_{i+1}Â_i‖_F, the relative
    change of the aggregated product made by the server after averaging
    (spec §7). Computed the same way in every round; it is exactly 0 when the
    server applies no step (FedSVD between SVD rounds, both baselines).
``aggregation_error``
    ‖ΔW − Σ_k p_k ΔW_k‖ / ‖Σ_k p_k ΔW_k‖ over all layers, with ΔW the change of
    the products B·A the server applies and ΔW_k each client's (CONTRACT).
    0 up to rounding for FedSVD and FFA-LoRA (A is shared, so the mean of
    B_kA equals B̄A); for FedAvg-LoRA it measures B̄Ā ≠ mean(B_kA_k).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import Tensor, nn

from fedlr.config import Config
from fedlr.lowrank.lora import (
    FACTORS,
    TRAINED_FACTORS,
    aggregate_lora,
    load_lora_state,
    lora_state,
    orthonormality_error,
    reconstruction_error,
    refactorize_state,
    svd_due,
)
from fedlr.lowrank.mud import aggregation_error
from fedlr.pretrain import build_lora_model
from fedlr.training import derive_seed
from strategies.base import FedlrStrategy

SVD_STREAM = 4  # seed stream of the randomized SVD solver (cf. strategies.base.SAMPLING_STREAM)
# Factors each method sends down; the up direction is fedlr.lowrank.lora.TRAINED_FACTORS.
DOWNLOAD_FACTORS: dict[str, tuple[str, ...]] = {"fedsvd": FACTORS, "ffa-lora": ("B",), "fedavg-lora": FACTORS}


def _layers(state: dict[str, Tensor]) -> list[str]:
    return sorted({key.rpartition(".")[0] for key in state})


def _products(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """B·A of every layer, in float64 (the unscaled update of W₀, spec §2)."""
    return {layer: state[f"{layer}.B"].double() @ state[f"{layer}.A"].double() for layer in _layers(state)}


class LoRAStrategy(FedlrStrategy, FlowerFedAvg):
    """Server of ``fedsvd``, ``ffa-lora`` and ``fedavg-lora`` (spec §2, §5).

    Parameters
    ----------
    cfg : Config
        The resolved configuration: ``method``, ``fedsvd.*`` (rank, alpha,
        svd_period, solver, pretrained model), ``seed``.
    node_to_partition : dict[int, int]
        Flower node id → partition id.

    Notes
    -----
    Round i: send :data:`DOWNLOAD_FACTORS` of (Â_i, B̂_i) to the sampled
    clients; receive their trained factors and ``num-examples``; average
    them weighted by ``num-examples`` (spec §2 "Aggregate"); for FedSVD,
    re-factorize B_{i+1}Â_i when :func:`~fedlr.lowrank.lora.svd_due` (paper
    Eq. 7). The strategy holds no state beyond the global arrays, which the
    round loop checkpoints, and the running maximum ε of the base class, so
    :meth:`state_dict` stays the base's empty dict.
    """

    def __init__(self, *, cfg: Config, node_to_partition: dict[int, int]) -> None:
        super().__init__(cfg=cfg, node_to_partition=node_to_partition)
        self.method: str = cfg["method"]
        self.download_factors = DOWNLOAD_FACTORS[self.method]
        self.upload_factors = TRAINED_FACTORS[self.method]
        self._trained_on: ArrayRecord | None = None

    # ----------------------------------------------------------- the global model
    def build_global_model(self, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, ArrayRecord]:
        """W₀ with adapters, and the initial global LoRA state (Â₀ from the seed, B̂₀ = 0)."""
        model = build_lora_model(self.cfg, input_shape, num_classes)
        return model, ArrayRecord(lora_state(model))

    def load_global_arrays(self, model: nn.Module, arrays: ArrayRecord) -> None:
        """Load A and B of every adapted layer; W₀ and the head never change."""
        load_lora_state(model, arrays.to_torch_state_dict())

    # ------------------------------------------------------------------- down
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Seeded sampling (base class) with only the factors the method sends down."""
        self._trained_on = arrays
        down = ArrayRecord(
            array_dict={k: arrays[k] for k in arrays if k.rpartition(".")[2] in self.download_factors}
        )
        return super().configure_train(server_round, down, config, grid)

    # --------------------------------------------------------------------- up
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the uploaded factors, then FedSVD's SVD step when due (spec §2).

        ``replies`` are checked and sorted by partition id
        (``FedlrStrategy.check_replies``), which fixes the float summation order.
        """
        if self._trained_on is None:
            raise RuntimeError(f"round {server_round}: aggregate_train called before configure_train")
        replies = list(replies)
        previous = self._trained_on.to_torch_state_dict()
        uploads = [
            record.to_torch_state_dict()
            for record in self.reply_arrays(
                server_round, replies, {k for k in previous if k.rpartition(".")[2] in self.upload_factors}
            )
        ]
        weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in replies]
        # B_{i+1} with the round's Â_i (A_{i+1} = Ā for FedAvg-LoRA).
        aggregated = {**previous, **aggregate_lora(uploads, weights)}
        if self.method == "fedsvd" and svd_due(server_round, self.cfg["fedsvd.svd_period"]):
            new = refactorize_state(
                aggregated, solver=self.cfg["fedsvd.solver"],
                seed=derive_seed(self.cfg["seed"], SVD_STREAM, server_round),
            )
        else:
            new = aggregated
        layers = _layers(new)
        self.round_extra["orthonormality_error"] = max(orthonormality_error(new[f"{n}.A"]) for n in layers)
        self.round_extra["reconstruction_error"] = max(
            reconstruction_error(aggregated[f"{n}.B"], aggregated[f"{n}.A"], new[f"{n}.B"], new[f"{n}.A"])
            for n in layers
        )
        before = _products(previous)
        applied = {n: p - before[n] for n, p in _products(new).items()}
        clients = [{n: p - before[n] for n, p in _products({**previous, **u}).items()} for u in uploads]
        self.round_extra["aggregation_error"] = aggregation_error(applied, clients, weights)
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        # Keep the key order of the global state, so checkpoints are byte-stable.
        return ArrayRecord({k: new[k].to(torch.float32).contiguous() for k in previous}), metrics
