"""Test support for damex, imported by tests, benchmarks and notebooks (never by
the runtime).

- :mod:`damex.testing.reference`: slow, obvious float64 NumPy references, one per
  ops family, and :func:`~damex.testing.reference.finite_difference`.
- :mod:`damex.testing.torch_twins`: the same maths written in PyTorch, one
  function per op (torch is imported inside the functions that need it).
- :mod:`damex.testing.dino_twin`: DINO/DAMEX written in PyTorch (imports torch),
  built on the torch_twins ops.
- :mod:`damex.testing.resnet_twin`: a torchvision-layout ResNet in PyTorch
  (imports torch).
- :mod:`damex.testing.timing`: the one timing harness of ``bench/*.py``.
"""
