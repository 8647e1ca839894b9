"""Adapters for readers and buttons attached to the box directly: one module per wire protocol.

Decoders are pure functions over bytes (no IO, sizes capped before anything is allocated); transports live in
the adapters that use them.
"""
