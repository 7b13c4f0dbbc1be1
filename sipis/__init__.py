"""sipis: a VoIP push-notification registration relay."""

__version__ = "0.1.0"
