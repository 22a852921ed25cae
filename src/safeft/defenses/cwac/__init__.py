"""CWAC, the flagship defense, and its two ablations (``cwac-weight``, ``cwac-activation``). See docs/cwac.md."""

from safeft.defenses.cwac.config import CWACActivationConfig, CWACConfig, CWACWeightConfig
from safeft.defenses.cwac.defense import CWAC, CWACActivation, CWACWeight

__all__ = ["CWAC", "CWACActivation", "CWACActivationConfig", "CWACConfig", "CWACWeight", "CWACWeightConfig"]
