"""Models: the built-in nets (all take [0,1] inputs and normalise inside) and user model factories.

:func:`build` is the one place a model *name* becomes a module: the CLI, ``train`` and
:func:`robustopt.load_model` all go through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from robustopt.errors import ConfigError
from robustopt.models.factory import build_from_spec, is_factory_spec
from robustopt.models.zoo import build_model


def build(
    spec: str,
    kwargs: dict[str, Any] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """The module ``spec`` names: a built-in net sized by the data (``mean``, ``std``, ``num_classes``,
    ``input_shape``), or a user's ``package.module:factory`` called with ``kwargs``.

    A factory is code: callers that got ``spec`` from a file someone else wrote must ask for consent
    first (see :func:`robustopt.load_model`'s ``trust_code``)."""
    if is_factory_spec(spec):
        return build_from_spec(spec, kwargs)
    if kwargs:
        raise ConfigError(f"--model-kwargs is only for package.module:factory models, not the built-in {spec!r}")
    if mean is None or std is None or num_classes is None or input_shape is None:
        raise ConfigError(f"the built-in model {spec!r} needs the data's mean, std, class count and input shape")
    return build_model(spec, mean=mean, std=std, num_classes=num_classes, input_shape=tuple(input_shape))


__all__ = ["build", "build_from_spec", "build_model", "is_factory_spec"]
