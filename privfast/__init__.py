"""privfast: fast private deep learning, and fast attacks to measure its privacy.

The public API lives in the submodules (``privfast.ops``, ...); this module re-exports the
entry points users reach for first.
"""

from privfast import ops
from privfast.ops import has_extension

__version__ = "0.1.0"

__all__ = ["has_extension", "ops", "__version__"]
