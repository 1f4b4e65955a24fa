"""Test support for damex, imported by tests, benchmarks and notebooks (never by
the runtime).

- :mod:`damex.testing.reference`: slow, obvious float64 NumPy references, one per
  ops family, and :func:`~damex.testing.reference.finite_difference`.
- :mod:`damex.testing.torch_twins`: the same maths written in PyTorch (torch is
  imported inside the functions that need it).
- :mod:`damex.testing.dino_twin`: DINO/DAMEX written in PyTorch (imports torch).
- :mod:`damex.testing.timing`: the one timing harness of ``bench/*.py``.
"""
