"""The replay engine: Numba kernels (``_kernels``) and their Python driver (``simulate``)."""

from altp2m_replay.engine.simulate import Replayer, SimResult, simulate_arrays

__all__ = ["Replayer", "SimResult", "simulate_arrays"]
