"""`python -m featuredb.indexer ...` is `featuredb index ...` (the entry point torchrun will use)."""

from ..cli import index

if __name__ == "__main__":
    index()
