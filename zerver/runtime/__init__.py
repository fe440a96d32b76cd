"""Running the model: the executor, the reactor job system, park points and
limiters, the interpreters that perform effects, the brokers and the consumer
runtime.

It writes the lifecycle records (:mod:`zerver.trace`) as it goes and never
builds or exports a span itself.

May import: :mod:`zerver.core`, :mod:`zerver.trace`, ``zerver._config``.
"""
