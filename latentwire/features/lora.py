"""`features.lora`: PEFT LoRA inside the frozen receivers.

The adapters are injected in place (`peft.inject_adapter_in_model`), so `receiver.model` stays the same HF model
(same `generate`, same decoder) and only gains `lora_A` / `lora_B` weights next to each targeted projection. They are
the only receiver parameters that train; they are saved with the trainable state (keys containing ".lora_") and
re-injected before loading because `LatentWire.__init__` builds the features.

Adapters are OFF by default and ON only inside `features.latent_context`: the text teacher (and every text-side
evaluation path) reads the unmodified receiver, the latent student reads it with LoRA.
"""

from __future__ import annotations

import torch.nn as nn

from latentwire.config import FeaturesConfig

LORA_KEY = ".lora_"  # every LoRA weight name contains it (lora_A, lora_B, lora_embedding_*, ...)


def apply(receiver, ft: FeaturesConfig) -> None:
    """Inject LoRA (rank, alpha, dropout, target module names, optionally only the first N layers) into `receiver`."""
    from peft import LoraConfig, inject_adapter_in_model

    n_layers = receiver.kv_geometry()[0]
    if ft.lora_layers > n_layers:
        raise ValueError(f"features.lora_layers={ft.lora_layers} but receiver {receiver.cfg.name!r} has only "
                         f"{n_layers} decoder layers")
    layers = list(range(ft.lora_layers)) if ft.lora_layers else None
    config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                        target_modules=list(ft.lora_targets), layers_to_transform=layers,
                        layers_pattern="layers" if layers else None, bias="none")
    if _tuner_layers(receiver):  # already adapted: a model rebuilt over these receivers (stage hand-off) keeps them
        set_enabled(receiver, False)
        return
    try:
        inject_adapter_in_model(config, receiver.model)
    except ValueError as err:
        raise ValueError(f"features.lora_targets {ft.lora_targets}: cannot adapt receiver {receiver.cfg.name!r}: "
                         f"{err}") from None
    for name, param in receiver.model.named_parameters():
        param.requires_grad_(LORA_KEY in name)
    receiver.train_mode_modules += [m for n, m in receiver.model.named_modules()
                                    if ".lora_dropout." in n and isinstance(m, nn.Dropout)]
    set_enabled(receiver, False)


def _tuner_layers(receiver) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in receiver.model.modules() if isinstance(m, BaseTunerLayer)]


def set_enabled(receiver, enabled: bool) -> None:
    """Switch LoRA on or off for the next forwards without touching requires_grad.

    PEFT's own `enable_adapters(False)` also sets requires_grad=False on the LoRA weights; flipping that between the
    student's forward and its backward would silently drop their gradients, so we set only the flag its layers read.
    """
    for layer in _tuner_layers(receiver):
        layer._disable_adapters = not enabled


def is_lora_key(key: str) -> bool:
    return LORA_KEY in key
