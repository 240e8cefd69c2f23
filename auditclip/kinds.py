"""Parameters, buffers, and how auditclip tells them apart.

A state dict mixes trained parameters with buffers: BatchNorm's running statistics,
position ids, rotary frequencies. Buffers are statistics or constants, not weights:
WGAN clamps ``netD.parameters()`` only, and clipping a ResNet's ``running_var``
wrecks its accuracy. So clipping and the range rules touch parameters by default.

Without the model, the name decides: the last segment ``weight``/``bias`` is a
parameter, a well-known buffer name is a buffer, anything else is ``unknown``
(treated like a parameter, and said so). With a model, ``named_buffers()`` and
``named_parameters()`` decide.
"""

from __future__ import annotations

from collections.abc import Collection

KINDS = ("parameter", "buffer", "unknown")

#: Last name segments that are buffers in torch, torchvision and transformers models.
BUFFER_NAMES = frozenset({
    "running_mean", "running_var", "num_batches_tracked",  # BatchNorm / InstanceNorm
    "position_ids", "token_type_ids",  # transformers embeddings
    "inv_freq", "cos_cached", "sin_cached",  # rotary embeddings
    "relative_position_index",  # Swin
})
PARAMETER_NAMES = frozenset({"weight", "bias"})


def tensor_kind(name: str, parameters: Collection[str] | None = None,
                buffers: Collection[str] | None = None) -> tuple[str, str]:
    """(kind, the rule that decided) for one tensor name.

    >>> tensor_kind("layer1.0.bn1.running_var")
    ('buffer', 'name: running_var is a buffer name')
    >>> tensor_kind("fc.weight")
    ('parameter', 'name: weight is a parameter name')
    >>> tensor_kind("cls_token")
    ('unknown', 'name: neither a known parameter nor buffer name (treated as a parameter)')
    >>> tensor_kind("cls_token", parameters={"cls_token"}, buffers=set())
    ('parameter', 'model: named_parameters()')
    """
    if buffers is not None and name in buffers:
        return "buffer", "model: named_buffers()"
    if parameters is not None and name in parameters:
        return "parameter", "model: named_parameters()"
    last = name.rsplit(".", 1)[-1]
    if last in BUFFER_NAMES:
        return "buffer", f"name: {last} is a buffer name"
    if last in PARAMETER_NAMES:
        return "parameter", f"name: {last} is a parameter name"
    return "unknown", "name: neither a known parameter nor buffer name (treated as a parameter)"


def is_buffer(name: str) -> bool:
    """True when :func:`tensor_kind` calls the name a buffer.

    >>> is_buffer("bn.running_mean"), is_buffer("bn.weight")
    (True, False)
    """
    return tensor_kind(name)[0] == "buffer"
