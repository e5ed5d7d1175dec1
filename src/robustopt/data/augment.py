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

# Dataset kinds (``Dataset.kind``) whose training images are augmented by default: the CIFAR family, where
# crop + flip is the published recipe. Image folders are augmented only when they hold natural colour images
# of at least MIN_AUGMENT_SIDE pixels a side: on 16×16 grayscale digits crop-with-pad-4 + flip kept training
# at chance (with --no-augment it reached 100%), and a mirrored "2" is no longer a "2". MNIST-like data,
# user ``.npz`` arrays and tensors are unknown content or flat features: the user opts in with ``--augment``.
AUGMENTED_KINDS = frozenset({"cifar10", "cifar100"})
SHAPE_DECIDES_KINDS = frozenset({"folder"})
PLAIN_KINDS = frozenset({"mnist", "fashion-mnist", "npz", "tensors"})
MIN_AUGMENT_SIDE = 32  # the crop moves up to 4 px each way: an eighth of a 32-px image, a quarter of a 16-px one


def default_augment(kind: str, input_shape: tuple[int, ...] | None = None) -> bool:
    """Whether crop + flip is on by default for data of this kind and input shape (``Dataset.kind``, ``input_shape``).

    True only where it is known to help: CIFAR-10/100, and image folders of colour images (C = 3) with
    height and width ≥ :data:`MIN_AUGMENT_SIDE` (when ``input_shape`` is not given, a folder gets False).
    False for MNIST-like data, small or grayscale folders, user ``.npz`` arrays, tensors and feature
    vectors (shape (D,)). An unknown kind is a ConfigError that says to choose with ``--augment``/``--no-augment``.
    """
    if kind not in AUGMENTED_KINDS | SHAPE_DECIDES_KINDS | PLAIN_KINDS:
        known = ", ".join(sorted(AUGMENTED_KINDS | SHAPE_DECIDES_KINDS | PLAIN_KINDS))
        msg = f"no augmentation default for dataset kind {kind!r}: use one of {known}, or pass --augment/--no-augment"
        raise ConfigError(msg)
    if input_shape is not None and len(input_shape) != 3:
        return False  # feature vectors have no geometry to crop or mirror
    if kind in AUGMENTED_KINDS:
        return True
    if kind in PLAIN_KINDS or input_shape is None:
        return False
    c, h, w = input_shape
    return c == 3 and min(h, w) >= MIN_AUGMENT_SIDE


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
