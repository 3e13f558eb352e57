"""altp2m-replay: price a Xen altp2m introspection policy on a recorded memory-access trace."""

__version__ = "0.1.0"
