"""The one exception type the SIP core raises for bad protocol input."""


class SipError(Exception):
    """A message (or part of one) that violates the SIP grammar or its rules.

    ``status`` is the response a UAS would send for a request that failed this
    way (400 for syntax, 505 for an unknown version, 413, 414, ...).  For a
    response that fails to parse there is nobody to answer: the caller drops it.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status

    def __repr__(self) -> str:
        return f"SipError({self.reason!r}, status={self.status})"
