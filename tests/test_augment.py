"""Augmentation: every output is a (possibly mirrored) window of the zero-padded input, drawn reproducibly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustopt.data.augment import augment_batch, default_augment
from robustopt.errors import ConfigError


def _candidates(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Every crop and mirrored crop of the zero-padded batch: (2, 2p+1, 2p+1, B, C, H, W)."""
    _, _, h, w = x.shape
    p = F.pad(x, (pad, pad, pad, pad))
    crops = torch.stack([torch.stack([p[:, :, a : a + h, b : b + w] for b in range(2 * pad + 1)]) for a in range(2 * pad + 1)])
    return torch.stack([crops, crops.flip(-1)])


def _match(x: torch.Tensor, out: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, 3) indices (flip, row offset, column offset) of the candidate equal to each output; -1 if none."""
    eq = (_candidates(x, pad) == out).flatten(4).all(-1)  # (2, 2p+1, 2p+1, B)
    found = eq.any(0).any(0).any(0)
    idx = eq.permute(3, 0, 1, 2).flatten(1).float().argmax(1)
    n = 2 * pad + 1
    coords = torch.stack([idx // (n * n), idx // n % n, idx % n], 1)
    return torch.where(found[:, None], coords, torch.full_like(coords, -1))


def test_every_output_is_a_shifted_crop_of_the_padded_input_and_flips_are_fair() -> None:
    x = torch.rand(600, 2, 5, 6) + 0.01  # no zeros inside: the padding is distinguishable from the image
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    m = _match(x, out, pad=2)
    assert (m >= 0).all(), "an output is not a window of the padded input"
    flips = m[:, 0].float().mean().item()
    assert 0.42 < flips < 0.58  # 600 fair coins: ±3.3 standard deviations
    counts = torch.bincount(m[:, 1] * 5 + m[:, 2], minlength=25)
    assert (counts > 0).all()  # all 25 offsets occur (each has probability 1/25)
    assert (m[:, 1:] != 2).any(1).float().mean() > 0.8  # most are shifted, not the identity


def test_same_seed_same_output_and_different_seed_differs() -> None:
    x = torch.rand(64, 3, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(7))
    b = augment_batch(x, torch.Generator().manual_seed(7))
    c = augment_batch(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_range_and_dtype_are_kept_for_float_and_uint8() -> None:
    g = torch.Generator().manual_seed(1)
    xf = torch.rand(32, 3, 32, 32)
    out = augment_batch(xf, g)
    assert out.min() >= 0 and out.max() <= 1 and (out == 0).any()  # padding brought in zeros, nothing else new
    xu = torch.randint(1, 256, (32, 3, 32, 32), dtype=torch.uint8)
    outu = augment_batch(xu, torch.Generator().manual_seed(1))
    assert outu.dtype == torch.uint8
    assert torch.equal(outu.float() / 255, augment_batch(xu.float() / 255, torch.Generator().manual_seed(1)))


def test_no_pad_no_flip_is_the_identity_and_flip_only_mirrors() -> None:
    x = torch.rand(16, 1, 4, 4)
    assert torch.equal(augment_batch(x, torch.Generator(), pad=0, flip=False), x)
    out = augment_batch(x, torch.Generator().manual_seed(3), pad=0)
    same, mirrored = (out == x).flatten(1).all(1), (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        augment_batch(torch.rand(4, 10), torch.Generator())
    with pytest.raises(ConfigError, match="padding"):
        augment_batch(torch.rand(4, 1, 3, 3), torch.Generator(), pad=-1)
    with pytest.raises(ConfigError, match="generator is on cpu, the batch on meta"):
        augment_batch(torch.empty(4, 1, 3, 3, device="meta"), torch.Generator())


@pytest.mark.parametrize(
    ("kind", "shape", "want"),
    [
        ("cifar10", (3, 32, 32), True),
        ("cifar100", None, True),
        ("folder", (3, 32, 32), True),  # natural colour images of 32 px and more
        ("folder", (3, 64, 48), True),
        ("folder", (1, 16, 16), False),  # the 16×16 digit folder that crop + flip kept at chance
        ("folder", (3, 16, 16), False),  # small colour images: a 4-px shift is a quarter of the image
        ("folder", (1, 64, 64), False),  # grayscale
        ("folder", (3, 31, 64), False),
        ("folder", None, False),  # shape unknown: off
        ("mnist", (1, 28, 28), False),
        ("fashion-mnist", None, False),
        ("npz", (3, 32, 32), False),  # unknown content: the user opts in
        ("npz", (20,), False),  # flat features
        ("tensors", (20,), False),
        ("cifar10", (20,), False),  # no geometry, whatever the name
    ],
)
def test_default_augment_only_where_it_is_known_to_help(kind: str, shape: tuple[int, ...] | None, want: bool) -> None:
    assert default_augment(kind, shape) is want


def test_default_augment_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="imagenet.*--augment/--no-augment"):
        default_augment("imagenet")
