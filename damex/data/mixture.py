"""A mixture of datasets: joint label space, sampler, batches.

* :class:`LabelSpace` maps every dataset's categories into one joint label
  space, by category name (``"Circle"`` and ``"circle "`` merge), keeping
  per-dataset local <-> joint maps; joint ids follow first appearance, dataset
  by dataset.
* :class:`MixtureDataset` indexes several :class:`~damex.data.coco.CocoDetection`
  by ``(dataset_id, index)`` and gives their targets joint labels.
* :class:`MixtureSampler` yields ``(dataset_id, index)`` pairs: proportional
  to dataset size, uniform over datasets, or by explicit weights.
* :func:`collate` pads a list of samples into one batch (DETR style) and
  :func:`iterate_batches` ties the three together.
"""
import numpy as np


def _norm_name(name):
    return " ".join(str(name).strip().lower().split())


class LabelSpace:
    """The joint label space of several datasets.

    Parameters
    ----------
    categories : sequence of sequence of dict
        ``categories[d]`` is dataset d's COCO category list (``{"id", "name"}``).
    dataset_names : sequence of str, optional
    merge_by_name : bool
        Merge categories of equal (normalised) name across datasets; if false,
        every dataset's categories are kept apart (``"NAME/category"``).

    Attributes
    ----------
    names : list of str
        Joint class names; ``num_classes = len(names)``.
    local_to_joint : list of dict
        ``local_to_joint[d][category_id] -> joint id``.
    joint_to_local : list of dict
        ``joint_to_local[d][joint id] -> category_id`` (only dataset d's classes).
    """

    def __init__(self, categories, dataset_names=None, merge_by_name=True):
        self.dataset_names = (list(dataset_names) if dataset_names is not None
                              else [f"dataset{d}" for d in range(len(categories))])
        if len(self.dataset_names) != len(categories):
            raise ValueError("LabelSpace: one name per dataset expected")
        self.names = []
        index = {}
        self.local_to_joint, self.joint_to_local = [], []
        for d, cats in enumerate(categories):
            l2j, j2l = {}, {}
            for c in cats:
                key = _norm_name(c["name"]) if merge_by_name else f"{self.dataset_names[d]}/{c['name']}"
                if key not in index:
                    index[key] = len(self.names)
                    self.names.append(key if not merge_by_name else str(c["name"]).strip())
                j = index[key]
                if j in j2l:
                    raise ValueError(f"dataset {self.dataset_names[d]!r}: two categories named "
                                     f"{c['name']!r} map to one joint class")
                l2j[c["id"]] = j
                j2l[j] = c["id"]
            self.local_to_joint.append(l2j)
            self.joint_to_local.append(j2l)

    @classmethod
    def from_datasets(cls, datasets, merge_by_name=True):
        return cls([ds.categories for ds in datasets], [ds.name for ds in datasets], merge_by_name)

    @property
    def num_classes(self):
        return len(self.names)

    @property
    def num_datasets(self):
        return len(self.local_to_joint)

    def to_joint(self, dataset_id, category_ids):
        """Dataset ``dataset_id``'s category ids -> joint ids (int64 array)."""
        m = self.local_to_joint[dataset_id]
        try:
            return np.array([m[int(c)] for c in np.ravel(category_ids)], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"category id {e.args[0]} is not in dataset "
                             f"{self.dataset_names[dataset_id]!r}") from None

    def to_local(self, dataset_id, joint_labels):
        """Joint ids -> dataset's category ids; -1 where the class is not in that dataset."""
        m = self.joint_to_local[dataset_id]
        return np.array([m.get(int(j), -1) for j in np.ravel(joint_labels)], dtype=np.int64)

    def dataset_mask(self):
        """bool ``[D, C]``: which joint classes belong to each dataset."""
        mask = np.zeros((self.num_datasets, self.num_classes), dtype=bool)
        for d, m in enumerate(self.joint_to_local):
            mask[d, list(m)] = True
        return mask

    def project(self, datasets):
        """This joint label space as seen by other datasets (a model's classes for data
        it was not trained on): categories match joint classes by name.

        Raises ValueError naming the dataset and category when a category is not a
        joint class.
        """
        index = {_norm_name(n): j for j, n in enumerate(self.names)}
        out = LabelSpace([], [])
        out.names = list(self.names)
        for ds in datasets:
            l2j = {}
            for c in ds.categories:
                key = _norm_name(c["name"])
                if key not in index:
                    raise ValueError(f"dataset {ds.name!r}: category {c['name']!r} (id {c['id']}) is "
                                     f"not one of the model's classes {self.names}")
                l2j[c["id"]] = index[key]
            out.dataset_names.append(ds.name)
            out.local_to_joint.append(l2j)
            out.joint_to_local.append({j: cid for cid, j in l2j.items()})
        return out

    def to_dict(self):
        return {"names": list(self.names), "datasets": {
            name: {str(cid): j for cid, j in m.items()}
            for name, m in zip(self.dataset_names, self.local_to_joint)}}

    @classmethod
    def from_dict(cls, data):
        """The inverse of :meth:`to_dict` (a checkpoint's label space, no data needed)."""
        out = cls([], [])
        out.names = list(data["names"])
        for name, m in data["datasets"].items():
            l2j = {int(cid): int(j) for cid, j in m.items()}
            out.dataset_names.append(name)
            out.local_to_joint.append(l2j)
            out.joint_to_local.append({j: cid for cid, j in l2j.items()})
        return out

    def __repr__(self):
        return f"LabelSpace({self.num_classes} classes over {self.num_datasets} datasets: {self.names})"


class MixtureDataset:
    """Several COCO datasets behind one index.

    Sets each dataset's ``dataset_id`` (its position) and joint label map, so
    their targets carry joint ``labels`` and the ``dataset_id``.

    Indexing: ``mix[dataset_id, index]`` or ``mix[flat_index]`` (datasets
    concatenated in order).
    """

    def __init__(self, datasets, label_space=None, merge_by_name=True):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("MixtureDataset needs at least one dataset")
        names = [ds.name for ds in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        self.label_space = label_space or LabelSpace.from_datasets(self.datasets, merge_by_name)
        for d, ds in enumerate(self.datasets):
            ds.dataset_id = d
            ds.set_joint_labels(self.label_space.local_to_joint[d])
        self._offsets = np.cumsum([0] + self.sizes)

    @property
    def names(self):
        return [ds.name for ds in self.datasets]

    @property
    def sizes(self):
        return [len(ds) for ds in self.datasets]

    @property
    def num_classes(self):
        return self.label_space.num_classes

    def __len__(self):
        return int(self._offsets[-1])

    def locate(self, flat_index):
        """Flat index -> ``(dataset_id, index)``."""
        if not 0 <= flat_index < len(self):
            raise IndexError(f"index {flat_index} out of range for a mixture of {len(self)} images")
        d = int(np.searchsorted(self._offsets, flat_index, side="right") - 1)
        return d, int(flat_index - self._offsets[d])

    def __getitem__(self, key):
        d, i = key if isinstance(key, tuple) else self.locate(int(key))
        return self.datasets[d][i]

    def load(self, d, i, rng=None):
        """Image ``i`` of dataset ``d``, transformed with ``rng`` driving random transforms."""
        return self.datasets[d].load(i, rng=rng)

    def __repr__(self):
        return f"MixtureDataset({', '.join(f'{n}: {s}' for n, s in zip(self.names, self.sizes))})"


class MixtureSampler:
    """Draw ``(dataset_id, index)`` pairs from a mixture, deterministically.

    Parameters
    ----------
    sizes : sequence of int
        Images per dataset.
    mode : {"proportional", "uniform", "weighted"}
        ``proportional``: every image once per epoch, shuffled (datasets in
        proportion to their size). ``uniform``: each draw picks a dataset
        uniformly, then the next image of that dataset's shuffled cycle (small
        datasets are repeated). ``weighted``: as uniform, with dataset
        probabilities ``weights / sum(weights)``.
    weights : sequence of float, optional
        Required for ``weighted``.
    seed : int
    num_samples : int, optional
        Draws per epoch; defaults to ``sum(sizes)``.

    Iterating gives one epoch; :meth:`set_epoch` changes the shuffle.
    """

    MODES = ("proportional", "uniform", "weighted")

    def __init__(self, sizes, mode="proportional", weights=None, seed=0, num_samples=None):
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 0 or sum(self.sizes) == 0:
            raise ValueError(f"MixtureSampler: sizes must be non-negative with a positive sum, got {sizes}")
        if mode not in self.MODES:
            raise ValueError(f"MixtureSampler: unknown mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode == "weighted":
            if weights is None or len(weights) != len(self.sizes):
                raise ValueError(f"MixtureSampler: mode 'weighted' needs one weight per dataset "
                                 f"({len(self.sizes)}), got {weights!r}")
            w = np.asarray(weights, dtype=np.float64)
            if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"MixtureSampler: weights must be non-negative with a positive sum, got {weights!r}")
        elif weights is not None:
            raise ValueError(f"MixtureSampler: weights are only used with mode 'weighted' (mode is {mode!r})")
        elif mode == "uniform":
            w = np.ones(len(self.sizes))
        else:
            w = np.asarray(self.sizes, dtype=np.float64)
        w = np.where(np.asarray(self.sizes) > 0, w, 0.0)
        if w.sum() <= 0:
            raise ValueError("MixtureSampler: every dataset with a positive weight is empty")
        self.probabilities = w / w.sum()
        self.seed = int(seed)
        self.num_samples = int(num_samples) if num_samples is not None else sum(self.sizes)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "proportional":
            pairs = np.array([(d, i) for d, n in enumerate(self.sizes) for i in range(n)], dtype=np.int64)
            order = []
            while len(order) < self.num_samples:
                order.extend(rng.permutation(len(pairs)).tolist())
            for k in order[:self.num_samples]:
                yield int(pairs[k, 0]), int(pairs[k, 1])
            return
        choices = rng.choice(len(self.sizes), size=self.num_samples, p=self.probabilities)
        cycles = [rng.permutation(n) for n in self.sizes]
        pos = [0] * len(self.sizes)
        for d in choices:
            d = int(d)
            if pos[d] == self.sizes[d]:
                cycles[d] = rng.permutation(self.sizes[d])
                pos[d] = 0
            yield d, int(cycles[d][pos[d]])
            pos[d] += 1


def collate(samples):
    """Pad samples into one batch, DETR style.

    Parameters
    ----------
    samples : list of (image float32 [3, H_i, W_i], target dict)

    Returns
    -------
    dict
        ``images`` float32 [B, 3, H, W] (zero padded to the batch max at the
        bottom/right), ``mask`` bool [B, H, W] (True on padding, as DETR's
        NestedTensor), ``targets`` list of dicts (boxes stay normalised to each
        unpadded image), ``dataset_ids`` int64 [B], ``image_sizes`` int64 [B, 2]
        (unpadded H, W).
    """
    if not samples:
        raise ValueError("collate: empty batch")
    images = []
    for k, (img, _) in enumerate(samples):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"collate: sample {k} image must be [3, H, W] (apply ToArray), got {img.shape}")
        images.append(img)
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    B = len(images)
    batch = np.zeros((B, 3, H, W), dtype=np.float32)
    mask = np.ones((B, H, W), dtype=bool)
    for b, im in enumerate(images):
        h, w = im.shape[1:]
        batch[b, :, :h, :w] = im
        mask[b, :h, :w] = False
    targets = [t for _, t in samples]
    return {
        "images": batch,
        "mask": mask,
        "targets": targets,
        "dataset_ids": np.array([int(t["dataset_id"]) for t in targets], dtype=np.int64),
        "image_sizes": np.array([im.shape[1:] for im in images], dtype=np.int64),
    }


def iterate_batches(mixture, sampler, batch_size, drop_last=False):
    """Yield collated batches of ``mixture`` in ``sampler`` order."""
    buf = []
    for d, i in sampler:
        buf.append(mixture[d, i])
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf and not drop_last:
        yield collate(buf)
