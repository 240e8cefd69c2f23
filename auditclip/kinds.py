"""Parameters, buffers, and how auditclip tells them apart.

A state dict mixes trained parameters with buffers: BatchNorm's running statistics,
position ids, rotary frequencies. Buffers are statistics or constants, not weights:
WGAN clamps ``netD.parameters()`` only, and clipping a ResNet's ``running_var``
wrecks its accuracy. So clipping and the range rules touch parameters by default.

Without the model, the name decides: the last segment ``weight``/``bias`` is a
parameter, a well-known buffer name is a buffer, anything else is ``unknown``
(treated like a parameter, and said so). With a model, ``named_buffers()`` and
``named_parameters()`` decide.

In a PEFT adapter folder the adapter config decides (:meth:`auditclip.formats.peft.AdapterIndex.kinds`):
its LoRA factors are ``adapter`` (trained tensors of the adapter, which clipping and the
range rule treat as parameters), and the update ΔW = scaling · B @ A that analysis adds
for each adapted module, a row named ``<module>.delta_weight``, is ``adapter_delta``
(never stored, so never clipped or range-checked element by element).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

KINDS = ("parameter", "buffer", "unknown", "adapter", "adapter_delta")

#: Last name segments that are buffers in torch, torchvision and transformers models.
BUFFER_NAMES = frozenset({
    "running_mean", "running_var", "num_batches_tracked",  # BatchNorm / InstanceNorm
    "position_ids", "token_type_ids",  # transformers embeddings
    "inv_freq", "cos_cached", "sin_cached",  # rotary embeddings
    "relative_position_index",  # Swin
    "weight_u",  # spectral_norm (torch.nn.utils.spectral_norm): the power-iteration vector u
    "_u", "_v",  # spectral_norm as a parametrization: parametrizations.weight.0._u / ._v
})
PARAMETER_NAMES = frozenset({
    "weight", "bias",
    "weight_orig",  # spectral_norm: the trained weight it normalises
    "weight_g",  # weight_norm: the magnitude
    "original", "original0", "original1",  # torch.nn.utils.parametrize: the trained tensor(s)
})


def tensor_kind(name: str, parameters: Collection[str] | None = None,
                buffers: Collection[str] | None = None, siblings: Collection[str] | None = None,
                adapter: Mapping[str, tuple[str, str]] | None = None) -> tuple[str, str]:
    """(kind, the rule that decided) for one tensor name.

    ``adapter``: ``(kind, rule)`` by name from a PEFT adapter's config
    (:meth:`auditclip.formats.peft.AdapterIndex.kinds`); it decides the names it holds.

    ``siblings``: the other tensor names of the checkpoint, for the one name that needs
    them: ``weight_v`` is spectral_norm's power-iteration buffer beside ``weight_u``, but
    weight_norm's trained direction beside ``weight_g``. Without them it is ``unknown``.

    >>> tensor_kind("layer1.0.bn1.running_var")
    ('buffer', 'name: running_var is a buffer name')
    >>> tensor_kind("fc.weight")
    ('parameter', 'name: weight is a parameter name')
    >>> tensor_kind("cls_token")
    ('unknown', 'name: neither a known parameter nor buffer name (treated as a parameter)')
    >>> tensor_kind("cls_token", parameters={"cls_token"}, buffers=set())
    ('parameter', 'model: named_parameters()')
    >>> tensor_kind("conv.weight_v", siblings={"conv.weight_orig", "conv.weight_u", "conv.weight_v"})[0]
    'buffer'
    >>> tensor_kind("conv.weight_v", siblings={"conv.weight_g", "conv.weight_v"})[0]
    'parameter'
    >>> tensor_kind("q.lora_A.weight", adapter={"q.lora_A.weight": ("adapter", "adapter_config.json: lora_A of q")})
    ('adapter', 'adapter_config.json: lora_A of q')
    """
    if adapter is not None and name in adapter:
        return adapter[name]
    if buffers is not None and name in buffers:
        return "buffer", "model: named_buffers()"
    if parameters is not None and name in parameters:
        return "parameter", "model: named_parameters()"
    prefix, _, last = name.rpartition(".")
    if last == "weight_v":
        beside = f"{prefix}." if prefix else ""
        if siblings is not None and f"{beside}weight_u" in siblings:
            return "buffer", "name: weight_v beside weight_u is spectral_norm's power-iteration vector"
        if siblings is not None and f"{beside}weight_g" in siblings:
            return "parameter", "name: weight_v beside weight_g is weight_norm's direction"
        return "unknown", "name: weight_v is weight_norm's direction or spectral_norm's vector (treated as a parameter)"
    if last in BUFFER_NAMES:
        return "buffer", f"name: {last} is a buffer name"
    if last in PARAMETER_NAMES:
        return "parameter", f"name: {last} is a parameter name"
    return "unknown", "name: neither a known parameter nor buffer name (treated as a parameter)"


def is_buffer(name: str, siblings: Collection[str] | None = None) -> bool:
    """True when :func:`tensor_kind` calls the name a buffer.

    >>> is_buffer("bn.running_mean"), is_buffer("bn.weight")
    (True, False)
    """
    return tensor_kind(name, siblings=siblings)[0] == "buffer"
