"""tracez: zerver's in-process trace pages (docs/tracez.md).

Owns the aggregator fed with each finished request record (``_aggregator``,
sans-I/O), who may see the pages (``_access``), and the pages with their JSON
API (``_pages``, with ``static/`` holding their CSS and script). Imports only
zerver's records, spans and HTTP value types; the trace engine and the export
pipeline are imported when a page first needs them.
"""

from ._access import Allow, check_path, parse_networks
from ._aggregator import (
    BUCKET_LABELS,
    BUCKET_LOWER_NS,
    NameSummary,
    Sample,
    TracezAggregator,
    latency_bucket,
    span_names,
)
from ._pages import ZPages

__all__ = [
    "BUCKET_LABELS",
    "BUCKET_LOWER_NS",
    "Allow",
    "NameSummary",
    "Sample",
    "TracezAggregator",
    "ZPages",
    "check_path",
    "latency_bucket",
    "parse_networks",
    "span_names",
]
