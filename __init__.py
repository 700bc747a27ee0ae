"""dualfocus: extract frozen video-encoder features once, then train the DualFocus connector on them."""

__version__ = "0.1.0"
