"""A message as a consumer sees it: the value a consumer's steps read, as a
request is for an HTTP route. Brokers make them (:mod:`zerver.runtime`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["Message"]


class Message:
    """A message as a consumer sees it."""

    __slots__ = ("attempt", "body", "headers", "id", "topic")

    def __init__(
        self, id: str, topic: str, body: bytes, headers: Mapping[str, str], attempt: int = 1
    ) -> None:
        self.id = id
        self.topic = topic
        self.body = body
        self.headers = dict(headers)
        self.attempt = attempt

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<Message {self.id} on {self.topic!r} attempt {self.attempt}>"
