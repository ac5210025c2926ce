"""Receiver-side features (latentwire/features): each trains only its own parameters, survives a checkpoint, and
touches the receiver exactly where it should (latent forwards, every decode step, the KV cache's shapes)."""

import json

import pytest
import torch

from latentwire import config as C
from latentwire import data as D
from latentwire import features
from latentwire.checkpoint import load_checkpoint_model
from latentwire.eval import latent_inputs
from latentwire.model import LatentWire
from latentwire.receivers import Receiver
from tests.conftest import ROOT, run_cli, small_overrides
from tests.helpers import train_steps, write_checkpoint

FEATURES = ["lora", "deep_prefix", "latent_adapters", "coprocessor"]
TINY_FEATURES = ["features.deep_prefix_hidden=16", "features.coprocessor_hidden=16", "features.latent_adapter_dim=16",
                 "features.lora_rank=4"]


def build(tiny_dir, extra: list[str]):
    """A fresh model (features mutate their receivers, so never share receivers between tests)."""
    cfg = C.load_config(ROOT / "configs" / "tiny.json", small_overrides(extra=TINY_FEATURES + extra))
    receivers = [Receiver.load(r, cfg.data.max_answer_tokens) for r in cfg.receivers]
    torch.manual_seed(cfg.train.seed)
    return cfg, LatentWire(cfg, receivers)


def small_batch(model, n: int = 2) -> dict:
    examples = D.read_file(str(D.EMBEDDED_SQUAD))[:n]
    contracts = {name: r.contract for name, r in model.receivers.items()}
    return D.collate(examples, contracts, model.cfg.data.max_prompt_bytes, model.cfg.losses.k_tokens)


@torch.no_grad()
def latent_outputs(model, batch, steps: int = 3) -> dict:
    """Per receiver, under the latent context: scoring logits over [P][BOS?][anchor] and greedy tokens."""
    model.eval()
    z = model.encode(batch["bytes"], batch["byte_mask"])
    out = {}
    for name, receiver in model.receivers.items():
        embeds, mask = latent_inputs(model, name, z)
        with features.latent_context(model, name, z):
            hidden = receiver.decoder_hidden(embeds, mask)
            tokens = receiver.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=steps,
                                             do_sample=False, pad_token_id=receiver.contract.pad_id)
        out[name] = (hidden, tokens)
    return out


@pytest.mark.parametrize("feature", FEATURES)
def test_feature_trains_alone_and_restores_from_checkpoint(feature, tiny_dir, tmp_path):
    cfg, model = build(tiny_dir, [f"features.{feature}=true"])
    assert features.active(cfg) == [feature]
    batch = small_batch(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    own = [n for n in before if features.feature_of(n) == feature]
    assert own, f"{feature} created no parameters"
    assert all(model.get_parameter(n).requires_grad for n in own)
    assert not [n for n, p in model.named_parameters()
                if n.startswith("receivers.") and p.requires_grad and features.feature_of(n) is None]
    train_steps(model, batch, 3, lr=1e-2)  # zero-initialized parts (LoRA B, adapter gates) unlock the rest after one step
    after = dict(model.named_parameters())
    assert [n for n in own if torch.equal(before[n], after[n].detach())] == []
    receivers_own = [n for n in before if n.startswith("receivers.") and features.feature_of(n) is None]
    assert [n for n in receivers_own if not torch.equal(before[n], after[n].detach())] == []

    # Text-side passes (the KD teacher, text evaluation paths) never see the feature.
    rb = batch["receivers"]["llama"]
    fresh = Receiver.load(cfg.receivers[0], cfg.data.max_answer_tokens)
    with torch.no_grad():
        taught = model.receivers["llama"].text_pass(rb["text_ids"], rb["text_mask"], rb["text_answer_start"], 4)
        assert torch.equal(taught, fresh.text_pass(rb["text_ids"], rb["text_mask"], rb["text_answer_start"], 4))

    # The checkpoint holds the feature and eval's loader restores it: outputs equal the in-memory model's.
    state = model.trainable_state_dict()
    assert set(own) <= set(state)
    _, loaded = load_checkpoint_model(write_checkpoint(model, tmp_path / "run"))
    live, again = latent_outputs(model, batch), latent_outputs(loaded, batch)
    for name in model.names:
        assert torch.equal(live[name][0], again[name][0]), name
        assert torch.equal(live[name][1], again[name][1]), name
    # ... and the feature is really on inside the latent context.
    with torch.no_grad():
        z = model.encode(batch["bytes"], batch["byte_mask"])
        embeds, mask = latent_inputs(model, "llama", z)
        plain = model.receivers["llama"].decoder_hidden(embeds, mask)
    assert not torch.allclose(plain, live["llama"][0])


def test_latent_adapters_fire_on_prefill_and_every_decode_step(tiny_dir):
    cfg, model = build(tiny_dir, ["features.latent_adapters=true", "features.latent_adapter_count=2"])
    receiver = model.receivers["qwen"]
    blocks = model.feature_modules["latent_adapters"]["qwen"]
    assert sorted(blocks) == ["0", "1"]  # 2 blocks over 2 layers, evenly spaced
    seen = []
    handle = blocks["1"].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    batch = small_batch(model)
    model.eval()
    with torch.no_grad():
        z = model.encode(batch["bytes"], batch["byte_mask"])
        embeds, mask = latent_inputs(model, "qwen", z)
        receiver.generate(mask, 3, inputs_embeds=embeds)  # outside the context: the hook stays silent
        assert seen == []
        with features.latent_context(model, "qwen", z):
            new = receiver.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5,
                                          min_new_tokens=5, do_sample=False, pad_token_id=receiver.contract.pad_id)
    handle.remove()
    assert new.shape[1] == 5
    # One prefill over the whole prefix, then one call per decode step (the 5th token needs no further forward).
    assert seen == [embeds.shape[1]] + [1] * 4


@pytest.mark.parametrize("feature", ["deep_prefix", "coprocessor"])
def test_kv_entries_have_the_receiver_cache_shapes(feature, tiny_dir):
    cfg, model = build(tiny_dir, [f"features.{feature}=true", "features.coprocessor_slots=3"])
    batch = small_batch(model)
    model.eval()
    z = model.encode(batch["bytes"], batch["byte_mask"])
    for name, receiver in model.receivers.items():
        n_layers, kv_heads, head_dim = receiver.kv_geometry()
        config = receiver.model.config
        assert kv_heads == config.num_key_value_heads < config.num_attention_heads  # the tiny receivers use GQA
        embeds, mask = latent_inputs(model, name, z)
        with torch.no_grad(), features.latent_context(model, name, z) as latent:
            source = model.feature_modules[feature][name]
            entries = source(latent.prefix if feature == "deep_prefix" else latent.slots)
            n_entries = latent.prefix.shape[1] if feature == "deep_prefix" else 3  # M slots or coprocessor_slots
            assert len(entries) == n_layers
            out = receiver.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
            # Greedy decoding through generate (prefix in the cache, mask and positions extended on every step)
            # agrees with one teacher-forced pass over prefix + generated tokens.
            tokens = receiver.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4,
                                             do_sample=False, pad_token_id=receiver.contract.pad_id)
            full = torch.cat([embeds, receiver.embed(tokens[:, :-1])], dim=1)
            hidden = receiver.decoder_hidden(full, torch.ones(full.shape[:2], dtype=torch.long))
        greedy = model.heads[name](hidden[:, embeds.shape[1] - 1:])["logits"].argmax(-1)
        for row, generated in enumerate(tokens.tolist()):  # a row ends at its EOS (padding follows)
            eos = receiver.contract.eos_id
            length = generated.index(eos) + 1 if eos in generated else len(generated)
            assert greedy[row, :length].tolist() == generated[:length], name
        for layer, (keys, values) in enumerate(entries):
            assert keys.shape == values.shape == (embeds.shape[0], kv_heads, n_entries, head_dim)
            cached = out.past_key_values.layers[layer]
            assert cached.keys.shape == (embeds.shape[0], kv_heads, n_entries + embeds.shape[1], head_dim)
            # Merged on the sequence axis: the feature's entries first, the receiver's own after them.
            assert torch.equal(cached.keys[:, :, :n_entries], keys.to(cached.keys.dtype))
            assert torch.equal(cached.values[:, :, :n_entries], values.to(cached.values.dtype))


def test_deep_prefix_and_coprocessor_are_exclusive(tmp_path):
    with pytest.raises(C.ConfigError, match="deep_prefix.*coprocessor"):
        C.load_config(ROOT / "configs" / "tiny.json", ["features.deep_prefix=true", "features.coprocessor=true"])
    proc = run_cli(["launch/train.py", "--config", "configs/tiny.json", "--output_dir", str(tmp_path / "x"),
                    "--set", "features.deep_prefix=true", "--set", "features.coprocessor=true"], check=False)
    assert proc.returncode != 0
    assert "features.deep_prefix" in proc.stderr and "features.coprocessor" in proc.stderr


@pytest.mark.parametrize("override, key", [
    ("features.lora_targets=[\"lm_head\"]", "features.lora_targets"),
    ("features.lora_dropout=1.0", "features.lora_dropout"),
    ("features.latent_adapter_dim=10", "features.latent_adapter_dim"),
    ("features.lora_rank=0", "features.lora_rank"),
])
def test_bad_feature_settings_name_their_key(override, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load_config(ROOT / "configs" / "tiny.json", [override])


def test_baseline_verification_turns_everything_off():
    on = ["features.lora=true", "features.latent_adapters=true", "losses.kd_weight=0.7",
          "curriculum.latent_keep_start=0.5", "curriculum.keep_ramp_steps=4", "train.baseline_verification=true"]
    cfg = C.load_config(ROOT / "configs" / "tiny.json", on)
    assert features.active(cfg) == [] and cfg.losses.kd_weight == 0.0
    assert cfg.curriculum == C.CurriculumConfig()
    assert features.active(C.load_config(ROOT / "configs" / "tiny.json", on[:2])) == ["lora", "latent_adapters"]


def test_optimizer_groups_and_defaults(tiny_dir):
    assert features.active(C.load_config(ROOT / "configs" / "tiny.json")) == []
    _, model = build(tiny_dir, ["features.lora=true", "features.coprocessor=true"])
    groups = features.optimizer_groups(model)
    assert [g["name"] for g in groups] == ["base", "lora", "coprocessor"]
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_parameters())


def test_lora_checkpoint_through_the_commands(tiny_dir, tmp_path):
    run = tmp_path / "run"
    cmd = ["launch/train.py", "--config", "configs/tiny.json", "--output_dir", str(run)]
    for s in small_overrides(2, ["features.lora=true", "eval.at_end=false"] + TINY_FEATURES):
        cmd += ["--set", s]
    run_cli(cmd)
    from safetensors.torch import load_file

    state = load_file(str(run / "checkpoints" / "latest" / "trainable.safetensors"))
    assert any(".lora_A." in k for k in state) and any(".lora_B." in k for k in state)
    run_cli(["launch/eval.py", "--checkpoint", str(run / "checkpoints" / "latest"), "--output_dir",
             str(tmp_path / "eval"), "--no_plots", "--set", "eval.max_examples=2", "--set", "eval.embed_replay=false"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["features"] == ["lora"]
