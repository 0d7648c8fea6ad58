"""The methods bench.py measures and report.py shows, as typed values: one row of results per method and length."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Method:
    """Full attention (chunk_batch None), or ParallelComp with up to chunk_batch chunks per forward, with or
    without KV eviction to half a chunk (the authors' capacity: ~2000 of 3600)."""
    chunk_batch: int | None = None
    kv_eviction: bool = False

    @property
    def label(self) -> str:
        """The row's name in results.csv, the tables and the plots: 'full', 'pc b=8', 'pc b=8 +kv'."""
        if self.chunk_batch is None:
            return "full"
        return f"pc b={self.chunk_batch}" + (" +kv" if self.kv_eviction else "")

    @property
    def one_chunk(self) -> Method:
        """The same with one chunk per forward: what 'equal output' compares a b > 1 method against."""
        return replace(self, chunk_batch=1)


FULL = Method()
CODES = ("full", "one", "many", "one+kv", "many+kv")  # --methods, in the order they run


def from_codes(codes: list[str], chunk_batch: int) -> list[Method]:
    """--methods codes to methods, in CODES order, each once ('many' is 'one' when chunk_batch is 1)."""
    by_code = {"full": FULL, "one": Method(1), "many": Method(chunk_batch), "one+kv": Method(1, True),
               "many+kv": Method(chunk_batch, True)}
    return list(dict.fromkeys(by_code[c] for c in CODES if c in codes))
