"""rptdata: corpus ingest, tokenization with exact byte spans, entropy scoring, manifests."""

__version__ = "0.1.0"
