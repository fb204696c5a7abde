"""Optimizers (DESIGN.md §6): AdamW, Muon, AdamH and MuonH behind one optimizer with AdamW groups
for embeddings, head, norms and biases (:mod:`.optimizers`); learning-rate and λ schedules
(:mod:`.schedules`)."""

from moealign.optim.optimizers import (
    AdamH,
    HyperballOptimizer,
    MatrixOptimizerWithAdamW,
    Muon,
    MuonH,
    build_optimizer,
    hyperball_step_,
    muon_lr_scale,
    newton_schulz_orthogonalize,
    parameter_groups,
    sphere_radius,
)

__all__ = [
    "AdamH",
    "HyperballOptimizer",
    "MatrixOptimizerWithAdamW",
    "Muon",
    "MuonH",
    "build_optimizer",
    "hyperball_step_",
    "muon_lr_scale",
    "newton_schulz_orthogonalize",
    "parameter_groups",
    "sphere_radius",
]
