"""bissl_kit: a notebook-first research kit for BiSSL (arXiv 2410.02387)."""

__version__ = "0.1.0"
