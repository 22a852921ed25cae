"""Built-in defenses. Each module registers its class with ``@register_defense``; importing this package registers
them all. A new defense is one module here plus one import line below."""

from safeft.defenses import sft  # noqa: F401
from safeft.defenses.base import (
    Defense,
    DefenseConfig,
    DefenseContext,
    build_defenses,
    defense_names,
    get_defense_class,
    register_defense,
)

# Optional imports: each defense module registers itself; they are listed here as they land.
for _mod in ("cwac", "pact", "asft", "safelora", "salora", "safeinstr", "lisa", "sppft"):
    try:
        __import__(f"safeft.defenses.{_mod}")
    except ModuleNotFoundError as _e:  # module not written yet
        if _e.name != f"safeft.defenses.{_mod}":
            raise

__all__ = [
    "Defense",
    "DefenseConfig",
    "DefenseContext",
    "build_defenses",
    "defense_names",
    "get_defense_class",
    "register_defense",
]
