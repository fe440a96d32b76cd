"""The HTTP/1.1 shell: connection rules over h11, the transports that drive
them, the server (listeners, workers, shutdown) and the router.

It hands a parsed request to a dispatch callable and writes its response; it
knows nothing of the job system or of tracing.

May import: :mod:`zerver.core`, ``zerver._config``.
"""
