"""Training-time augmentation: random crop with zero padding and horizontal flip, on the batch's device.

The standard CIFAR recipe (He et al. 2016; every published CIFAR robustness number since Madry
et al. 2018 uses it): pad each image with ``pad`` zero pixels on every side, cut a random H×W
window out of the padded image, and mirror it left–right with probability ½. For an input
x (B, C, H, W) and per-example offsets (a, b) ∈ {0, …, 2·pad}² and flip f ∈ {0, 1},

    out[n, c, i, j] = P[n, c, a + i, b + (W − 1 − j if f else j)],    P = zero-pad(x, pad).

The crop and the flip are one gather with a per-example index, so there is no Python loop over
examples and it runs wherever ``x`` lives. Randomness comes only from the ``generator`` passed in
(same device as ``x``), so a seeded generator reproduces the batch exactly, and a resumed run
that restores the generator's state continues the same random stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustopt.errors import ConfigError

# Dataset kinds (``Dataset.kind``) whose training images are augmented by default: natural photographs,
# where a shifted or mirrored image is still the same class. Digits and clothing (MNIST-like) and
# arbitrary arrays are not: a mirrored "2" is no longer a "2", and features have no geometry.
AUGMENTED_KINDS = frozenset({"cifar10", "cifar100", "folder"})
PLAIN_KINDS = frozenset({"mnist", "fashion-mnist", "npz", "tensors"})


def default_augment(kind: str) -> bool:
    """Whether crop + flip is on by default for a dataset of this kind (``Dataset.kind`` or a built-in name).

    On for CIFAR-10/100 and image folders; off for MNIST-like data, user ``.npz`` arrays and tensors
    (their content is unknown, so the user opts in with ``--augment``).
    """
    if kind in AUGMENTED_KINDS:
        return True
    if kind in PLAIN_KINDS:
        return False
    known = ", ".join(sorted(AUGMENTED_KINDS | PLAIN_KINDS))
    raise ConfigError(f"no augmentation default for dataset kind {kind!r}: use one of {known}, or pass --augment/--no-augment")


def augment_batch(x: torch.Tensor, generator: torch.Generator, *, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop of the zero-padded image plus random horizontal flip, per example.

    Args:
        x: images (B, C, H, W), any dtype (uint8 or float in [0, 1]); values are only moved, never changed,
            so the output stays in the input's range (padding adds zeros).
        generator: a ``torch.Generator`` on ``x``'s device; the only source of randomness.
        pad: zero padding on each side, so offsets are uniform on {0, …, 2·pad} in each direction (0: no crop).
        flip: mirror each example left–right with probability ½.

    Returns:
        A new tensor like ``x`` (B, C, H, W). Draws, in order: row offsets (B,), column offsets (B,), flips (B,).
    """
    if x.dim() != 4:
        raise ConfigError(f"augmentation needs image batches (B, C, H, W), got shape {tuple(x.shape)}; use --no-augment")
    if pad < 0:
        raise ConfigError(f"augmentation padding must be >= 0, got {pad}")
    if generator.device.type != x.device.type:
        raise ConfigError(f"augmentation generator is on {generator.device}, the batch on {x.device}; create it there")
    b, c, h, w = x.shape
    dev = x.device
    rows = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    cols = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    j = torch.arange(w, device=dev)
    col_index = cols[:, None] + j  # (B, W): window columns in the padded image
    if flip:
        mirrored = torch.randint(0, 2, (b,), generator=generator, device=dev).bool()
        col_index = torch.where(mirrored[:, None], cols[:, None] + (w - 1 - j), col_index)
    row_index = rows[:, None] + torch.arange(h, device=dev)  # (B, H)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x  # zeros: the black border of the recipe
    # Two gathers: first pick each example's H rows, then its W columns (already mirrored where flipped).
    picked = padded.gather(2, row_index[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return picked.gather(3, col_index[:, None, None, :].expand(b, c, h, w))
