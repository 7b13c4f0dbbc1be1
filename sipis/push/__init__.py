"""Pushes: what they carry, the providers that send them, and the outcomes they report."""
