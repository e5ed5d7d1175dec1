"""Data, one job per module (imports point down this list, never up; no robustopt import inside a function):

* :mod:`~robustopt.data.locations`: where files live (lookup directories, the user cache, bundled MNIST);
* :mod:`~robustopt.data.validation`: checks of arrays, labels and shapes, and the stated size limits;
* :mod:`~robustopt.data.formats`: ``.npz``, IDX and CIFAR binaries, read without pickle;
* :mod:`~robustopt.data.folders`: image folders, decoded with Pillow and cached;
* :mod:`~robustopt.data.builtin`: the built-in datasets' statistics and file lookup;
* :mod:`~robustopt.data.datasets`: the entry point, :func:`~robustopt.data.datasets.load_dataset` and ``Dataset``;
* :mod:`~robustopt.data.fingerprint`: a content hash of the data a run trained on;
* :mod:`~robustopt.data.augment` and :mod:`~robustopt.data.download`: augmentation and explicit downloads.
"""
