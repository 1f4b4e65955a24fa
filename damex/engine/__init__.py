"""Training loop, evaluation (COCO AP per dataset), routing analysis, checkpoints.

Submodules import their heavy dependencies (pycocotools, matplotlib) lazily,
so ``import damex`` stays cheap.
"""
