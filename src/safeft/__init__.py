"""safeft: fine-tune an aligned LLM on your data without losing its safety alignment."""

from safeft.errors import SafeFTError

__version__ = "0.1.0"

__all__ = ["SafeFTError", "__version__"]
