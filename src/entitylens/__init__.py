"""entitylens: entity-tracking interpretability (the boxes task) for base vs code/math/aligned LMs."""

from entitylens.errors import EntitylensError

__version__ = "0.1.0"

__all__ = ["EntitylensError", "__version__"]
