"""Sans-IO SIP: messages, URIs, digest, transactions and registration.

Nothing in this package performs I/O or reads a clock: bytes and ``now`` go
in, events, bytes to send and deadlines come out.
"""
