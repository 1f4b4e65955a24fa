"""The per-forward context: what goes down with the data and what comes back up.

One :class:`ForwardContext` is made for every forward pass of a model and handed
to the modules that need more than their input:

* down: the images' dataset ids (:meth:`token_dataset_ids` lays them out per
  token), whether the labels may be used (training), and the random streams:
  :meth:`rng` derives a module's Generator from ``(seed, step, module path)``, so
  a step replays bit for bit and a resumed run continues exactly, for any module,
  whatever its name, with nothing to re-seed;
* up: every routing loss (:attr:`losses`) and routing record (:attr:`records`)
  of the MoE layers, in call order, so a layer called twice reports twice.
"""
import zlib

import numpy as np

__all__ = ["ForwardContext"]


class ForwardContext:
    """Per-forward inputs and results.

    Parameters
    ----------
    dataset_ids : ndarray [B] of int, optional
        The dataset of every image (statistics always; the DAMEX loss only when
        ``use_labels``).
    use_labels : bool
        Whether modules may use ``dataset_ids`` for their losses (training).
    seed, step : int
        Derive every random stream of this forward (see :meth:`rng`).
    root : Module, optional
        The model; module paths for :meth:`rng` are its ``named_modules()`` names.
    first_image : int
        Index in the step's global batch of this forward's first image (a rank's offset
        under data parallelism), so per-image streams (:meth:`image_rngs`) do not depend
        on how the batch is split.
    """

    def __init__(self, dataset_ids=None, *, use_labels=True, seed=0, step=0, root=None,
                 first_image=0):
        self.dataset_ids = None if dataset_ids is None else np.asarray(dataset_ids, np.int64)
        self.use_labels = bool(use_labels)
        self.seed, self.step = int(seed), int(step)
        self.first_image = int(first_image)
        self._root = root
        self._paths = None
        self.losses = []      # (layer name, Tensor) per MoE call
        self.records = []     # (layer name, dict of NumPy arrays) per MoE call

    # -- down ---------------------------------------------------------------------

    def path(self, module):
        """``module``'s name in the root model ("" for the root itself)."""
        if self._paths is None:
            if self._root is None:
                raise ValueError("ForwardContext: rng(module) needs root=the model (or pass a name)")
            self._paths = {id(m): name for name, m in self._root.named_modules()}
        try:
            return self._paths[id(module)]
        except KeyError:
            raise ValueError(f"ForwardContext: {type(module).__name__} is not a module of the root "
                             "model") from None

    def rng(self, module_or_name, *extra):
        """A Generator for one random stream of this forward: seeded by ``(seed, step,
        crc32(path), *extra)``, where path is the module's name in the root model (or the
        given string).  The same stream gives the same bits on every replay."""
        name = module_or_name if isinstance(module_or_name, str) else self.path(module_or_name)
        key = zlib.crc32(name.encode("utf-8"))
        return np.random.default_rng([self.seed, self.step, key, *map(int, extra)])

    def image_rngs(self, module_or_name, batch):
        """One Generator per image of a ``batch``-image forward, each the stream
        ``rng(module_or_name, "image", global index)``: the same draw for an image whatever
        rank holds it."""
        return [self.rng(module_or_name, 1 << 20, self.first_image + b) for b in range(batch)]

    def token_dataset_ids(self, batch, length):
        """Dataset id of every token of a ``[batch, length, D]`` block flattened batch-major
        (token ``b * length + l`` belongs to image ``b``); None without ids."""
        if self.dataset_ids is None:
            return None
        if self.dataset_ids.shape != (batch,):
            raise ValueError(f"dataset_ids: expected one id per image ({batch}), got shape "
                             f"{self.dataset_ids.shape}")
        return np.repeat(self.dataset_ids, length)

    # -- up -----------------------------------------------------------------------

    def add_routing(self, name, loss, record):
        """Report one MoE call: its routing loss (a Tensor of shape ()) and its record."""
        self.losses.append((name, loss))
        self.records.append((name, record))
