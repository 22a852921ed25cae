"""Pure building blocks shared by defenses: projections, covariance, activation capture with early exit, TopK SAE,
on-disk activation shards."""

from safeft.components.activation_store import ShardReader, ShardWriter
from safeft.components.capture import (
    capture_module_rows,
    decoder_layers,
    run_to_layer,
    run_to_layers,
    shared_input_groups,
)
from safeft.components.projection import (
    basis_from_rows,
    energy_inside,
    project_rows_out,
    project_update_out,
    top_energy_basis,
)
from safeft.components.sae import (
    StoreRows,
    TensorRows,
    TopKSAE,
    check_sae_fits,
    load_sae,
    sae_stats,
    save_sae,
    train_sae,
)

__all__ = [
    "ShardReader",
    "ShardWriter",
    "StoreRows",
    "TensorRows",
    "TopKSAE",
    "basis_from_rows",
    "capture_module_rows",
    "check_sae_fits",
    "decoder_layers",
    "energy_inside",
    "load_sae",
    "project_rows_out",
    "project_update_out",
    "run_to_layer",
    "run_to_layers",
    "sae_stats",
    "save_sae",
    "shared_input_groups",
    "top_energy_basis",
    "train_sae",
]
