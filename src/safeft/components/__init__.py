"""Pure building blocks shared by defenses: projections, covariance, activation capture with early exit, TopK SAE."""

from safeft.components.capture import capture_module_inputs, decoder_layers, run_to_layer
from safeft.components.projection import (
    CovarianceAccumulator,
    project_rows_out,
    project_update_out,
    top_energy_basis,
)
from safeft.components.sae import TopKSAE, check_sae_fits, load_sae, sae_stats, save_sae, train_sae

__all__ = [
    "CovarianceAccumulator",
    "TopKSAE",
    "capture_module_inputs",
    "check_sae_fits",
    "decoder_layers",
    "load_sae",
    "project_rows_out",
    "project_update_out",
    "run_to_layer",
    "sae_stats",
    "save_sae",
    "top_energy_basis",
    "train_sae",
]
