"""spdsim: a discrete-event simulator of Speculative Pipeline Decoding (never imports torch)."""
__version__ = "0.1.0"
