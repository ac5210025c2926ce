"""Optional receiver-side features, all off by default (`features.*` in the config).

    lora             PEFT LoRA inside the receivers (lora.py)
    deep_prefix      per-layer key/value prefixes from the calibrated latent (kv_prefix.py)
    latent_adapters  gated cross-attention from the residual stream to the latent (latent_adapters.py)
    coprocessor      cache entries from the pooled latent (kv_prefix.py); exclusive with deep_prefix

The trainer and the model call these plain functions at fixed points; there is no plugin machinery:

    build(model)                    LatentWire.__init__: inject LoRA, create feature modules, attach hooks
    latent_context(model, name, z)  around every latent-path forward of receiver `name` (training, scoring,
                                    generation): installs the example's latent for the hooks and turns LoRA on
    optimizer_groups(model)         parameter groups for the optimizer, one per feature
    metrics(model)                  feature diagnostics for metrics.jsonl (latent-adapter gates)
    checkpoint_state(model) / load_checkpoint_state(model, state)  what trainer_state.json carries (the active
                                    features and the curriculum state, latentwire/curriculum.py)

Feature modules live in `LatentWire.feature_modules` (outside `receivers.`), LoRA weights inside the receivers under
keys containing ".lora_": both are part of `LatentWire.trainable_state_dict`, so every checkpoint holds them and
`launch/eval.py`, which rebuilds `LatentWire` (and so calls `build`), restores them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from latentwire.config import Config
from latentwire.distributed import gathered
from latentwire.features import latent_adapters, lora
from latentwire.features.kv_prefix import Coprocessor, DeepPrefix

FEATURES = ("lora", "deep_prefix", "latent_adapters", "coprocessor")


@dataclass
class Latent:
    """What the hooks of one receiver read during a latent-path forward."""

    slots: torch.Tensor  # (B, M, d_z) the wire slots this receiver reads (shared + its private ones)
    prefix: torch.Tensor  # (B, M, H) the calibrated soft tokens P


def active(cfg: Config) -> list[str]:
    """Names of the features switched on, in a fixed order."""
    return [name for name in FEATURES if getattr(cfg.features, name)]


def build(model) -> nn.ModuleDict:
    """Create every active feature for every receiver of `model` (a LatentWire whose receivers are in place).

    Returns the ModuleDict to store as `model.feature_modules`: {feature: {receiver name: module}}."""
    ft = model.cfg.features
    modules = nn.ModuleDict()
    if ft.deep_prefix:
        modules["deep_prefix"] = nn.ModuleDict({
            name: DeepPrefix(r.hidden_size, *r.kv_geometry(), ft.deep_prefix_hidden)
            for name, r in model.receivers.items()})
    if ft.coprocessor:
        modules["coprocessor"] = nn.ModuleDict({
            name: Coprocessor(model.cfg.encoder.d_z, *r.kv_geometry(), ft.coprocessor_slots, ft.coprocessor_hidden)
            for name, r in model.receivers.items()})
    if ft.latent_adapters:
        modules["latent_adapters"] = nn.ModuleDict({
            name: nn.ModuleDict({
                str(i): latent_adapters.LatentCrossAttention(r.hidden_size, ft.latent_adapter_dim,
                                                             ft.latent_adapter_heads)
                for i in latent_adapters.adapter_layers(r.kv_geometry()[0], ft.latent_adapter_count,
                                                        ft.latent_adapter_layers)})
            for name, r in model.receivers.items()})
    for name, receiver in model.receivers.items():
        if ft.lora:
            lora.apply(receiver, ft)
        if ft.deep_prefix:
            receiver.set_kv_source(lambda latent, m=modules["deep_prefix"][name]: m(latent.prefix))
        if ft.coprocessor:
            receiver.set_kv_source(lambda latent, m=modules["coprocessor"][name]: m(latent.slots))
        if ft.latent_adapters:
            latent_adapters.attach(receiver, modules["latent_adapters"][name])
    return modules


def is_trainable_receiver_key(key: str) -> bool:
    """State-dict keys under `receivers.` that train (and so are checkpointed): the LoRA weights."""
    return lora.is_lora_key(key)


@contextlib.contextmanager
def latent_context(model, name: str, z: torch.Tensor, prefix: torch.Tensor | None = None):
    """Install the latent of a batch for receiver `name`: z (B, M_total, d_z) as decoded from the wire, prefix
    (B, M, H) the calibrated soft tokens when already computed. Every receiver forward inside the block (the
    teacher-forced pass, scoring, `generate` with all its decode steps) sees the features; outside it, none do.
    A no-op when no feature is on."""
    if not active(model.cfg):
        yield None
        return
    receiver = model.receivers[name]
    if receiver.latent is not None:
        raise RuntimeError(f"receiver {name!r} already has a latent installed (nested latent_context)")
    if prefix is None:
        prefix = model.prefix(z, name)
    receiver.latent = Latent(slots=model.encoder.slots_for(z, model.names.index(name)), prefix=prefix)
    if model.cfg.features.lora:
        lora.set_enabled(receiver, True)
    try:
        yield receiver.latent
    finally:
        receiver.latent = None
        receiver._kv_len = 0
        if model.cfg.features.lora:
            lora.set_enabled(receiver, False)


def feature_of(param_name: str) -> str | None:
    """Which feature a parameter of LatentWire belongs to (None for the encoder and adapters)."""
    if param_name.startswith("feature_modules."):
        return param_name.split(".")[1]
    if param_name.startswith("receivers.") and lora.is_lora_key(param_name):
        return "lora"
    return None


def optimizer_groups(model) -> list[dict]:
    """Trainable parameters grouped as [{"name": "base" | feature, "params": [...]}], in a fixed order (same lr;
    groups let a run log or tune one feature's parameters)."""
    groups: dict[str, list] = {}
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(feature_of(param_name) or "base", []).append(param)
    return [{"name": key, "params": groups[key]} for key in ("base", *FEATURES) if key in groups]


@torch.no_grad()
def metrics(model) -> dict:
    """Feature diagnostics: tanh(gate) of every latent-adapter block."""
    out = {}
    blocks = model.feature_modules["latent_adapters"] if "latent_adapters" in model.feature_modules else {}
    for name, per_layer in blocks.items():
        for layer, block in per_layer.items():
            with gathered([block.gate]):
                out[f"features/gate/{name}/{layer}"] = float(torch.tanh(block.gate.detach().float()).mean())
    return out


def checkpoint_state(model) -> dict:
    """What trainer_state.json keeps for the features and curriculum: the active features and curriculum state."""
    return {"active": active(model.cfg), "curriculum": dict(model.curriculum_state)}


def load_checkpoint_state(model, state: dict) -> None:
    saved = state.get("active", [])
    if saved != active(model.cfg):
        raise ValueError(f"checkpoint was trained with features {saved}, the config now enables {active(model.cfg)}")
    model.curriculum_state = dict(state.get("curriculum", {}))
