"""From records to telemetry: the request and job records (one schema), the
promotion engine, the trace builder and its semantic conventions,
propagation, sampling, metrics, logging's correlation, and the exporter
process that does this work off the request path.

May import: :mod:`zerver.core`, :mod:`zerver.export`, ``zerver._config``;
never the runtime, the HTTP shell or the app.
"""
