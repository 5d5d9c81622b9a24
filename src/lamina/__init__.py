"""lamina: distributed block storage with translucent layers."""

from lamina.errors import ErrorCode, LaminaError

__version__ = "0.1.0"

__all__ = ["ErrorCode", "LaminaError", "__version__"]
