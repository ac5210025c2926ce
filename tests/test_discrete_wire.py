"""The learned discrete wire end to end (encoder.quantizer): the encoder's slots are de-quantized FSQ codes, the
code payload (wire v2) rebuilds exactly what the adapters read in training, evaluation reports the code bytes and
their ratios to the text (UTF-8, zstd, zstd with a dictionary trained on the training prompts), and the config
refuses a quantizer without the "code" precision (and the reverse)."""

import pytest
import torch

from latentwire import config as C
from latentwire import data as D
from latentwire import eval as E
from latentwire import wire
from latentwire.model import LatentWire
from tests.conftest import ROOT
from tests.helpers import EVAL_OVERRIDES, eval_examples, train_steps

FSQ = ["encoder.quantizer.kind=fsq", "encoder.quantizer.levels=[8,5,5,5]", "encoder.quantizer.private_levels=[4,4]",
       "eval.wire_precision=code", 'eval.precisions=["code","int8"]']


@pytest.fixture(scope="module")
def model(tiny_receivers):
    cfg = C.load_config(ROOT / "configs" / "tiny.json", EVAL_OVERRIDES + FSQ)
    torch.manual_seed(0)
    return LatentWire(cfg, tiny_receivers)


def test_code_payload_rebuilds_the_training_latent(model):
    prompts = [D.prompt_text(ex, 256).encode() for ex in eval_examples()]
    ids, mask = D.bytes_to_tensor(prompts, 256)
    z, codes = model.encoder(ids, mask, with_codes=True)
    payloads = model.to_wire(z, codes, "code", 64)
    q = model.encoder.quantizer
    slots = model.encoder.n_slots
    assert q.bits_per_slot() == [10] * model.cfg.encoder.m_shared + [4] * (slots - model.cfg.encoder.m_shared)
    assert all(len(p) == wire.code_payload_nbytes(q.levels_per_slot()) for p in payloads)
    assert len(payloads[0]) == wire.code_header_nbytes(slots) + (sum(q.bits_per_slot()) + 7) // 8
    assert torch.equal(model.from_wire(payloads), z.detach())  # what crossed the wire is what training saw
    with pytest.raises(wire.WireFormatError):
        model.from_wire([payloads[0][:-1]])


def test_quantized_model_trains_through_the_codes(model, tiny_receivers):
    cfg = C.load_config(ROOT / "configs" / "tiny.json", EVAL_OVERRIDES + FSQ)
    torch.manual_seed(1)
    fresh = LatentWire(cfg, tiny_receivers)
    batch = D.collate(eval_examples(), {r.cfg.name: r.contract for r in tiny_receivers}, 256, 4)
    before = {k: v.clone() for k, v in fresh.encoder.named_parameters()}
    losses = train_steps(fresh, batch, 3, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in fresh.encoder.named_parameters() if not torch.equal(before[k], v)]
    assert any(k.startswith("quantizer.") for k in changed) and any(k.startswith("layers.") for k in changed)


def test_evaluation_reports_code_bytes_and_dictionary_baseline(model):
    train = D.load_splits(C.DataConfig()).train
    result, rows = E.evaluate(model, eval_examples(), latency=False, train_examples=train,
                              paths=["text", "latent", "latent_int8", "byte_budget", "byte_budget_int8"])
    w = result["wire"]
    code = wire.code_payload_nbytes(model.encoder.quantizer.levels_per_slot())
    assert w["latent_bytes"]["code"] == code < w["latent_bytes"]["int8"]
    assert w["latent_bytes_ideal"]["code"] == sum(model.encoder.quantizer.bits_per_slot()) / 8
    assert w["text_bytes_zstd_dict"] < w["text_bytes_zstd"] < w["text_bytes_utf8"]
    assert w["zstd_dict_bytes"] > 0
    for name in result["receivers"]:
        comp = w["compression"][name]
        assert comp["bytes_utf8"]["code"] == pytest.approx(w["text_bytes_utf8"] / code)
        assert comp["bytes_zstd_dict"]["code"] == pytest.approx(w["text_bytes_zstd_dict"] / code)
        assert result[name]["latent"]["bytes"] == code
        entry = result[name]["byte_budget"]  # the text cut to the code payload's bytes, question kept
        assert entry["bytes"] <= code or entry["budget_overruns"] > 0


def test_config_ties_the_code_precision_to_the_quantizer():
    with pytest.raises(C.ConfigError, match="'code'"):
        C.load_config(ROOT / "configs" / "tiny.json", ["encoder.quantizer.kind=fsq"])
    with pytest.raises(C.ConfigError, match="'code'"):
        C.load_config(ROOT / "configs" / "tiny.json", ["eval.wire_precision=code", 'eval.precisions=["code"]'])
    with pytest.raises(C.ConfigError, match=r"encoder\.quantizer\.levels\.1"):
        C.load_config(ROOT / "configs" / "tiny.json", FSQ[:1] + ["encoder.quantizer.levels=[8,1]"] + FSQ[3:])
