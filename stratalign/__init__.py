"""stratalign: align frozen unimodal encoders with lightweight heads on cached every-layer features."""

from stratalign.errors import StratalignError

__version__ = "0.1.0"

__all__ = ["StratalignError", "__version__"]
