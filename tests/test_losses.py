"""Loss assembly: token normalization, per-example (hard-negative) KD weights."""

import torch

from latentwire.losses import hard_negative_weights
from latentwire.losses import LMHeadLoss, kd_loss


def _setup(b=3, k=2, h=8, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, k, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g)
    teacher = torch.randn(1, b, k, v, generator=g)
    targets = torch.randint(0, v, (b, k), generator=g)
    targets[1, 1] = -100
    return hidden, weight, teacher, targets


def test_unit_example_weights_equal_the_batched_kd():
    hidden, weight, teacher, targets = _setup()
    batched = kd_loss(hidden, weight, teacher, targets, 2.0)
    per_example = kd_loss(hidden, weight, teacher, targets, 2.0, example_weights=torch.ones(3))
    torch.testing.assert_close(per_example, batched, atol=1e-6, rtol=1e-6)


def test_example_weights_scale_each_example():
    hidden, weight, teacher, targets = _setup()
    w = torch.tensor([2.0, 0.5, 0.5])
    weighted = kd_loss(hidden, weight, teacher, targets, 1.0, example_weights=w)
    parts = [kd_loss(hidden[i:i + 1], weight, teacher[:, i:i + 1], targets[i:i + 1], 1.0, norm=1.0) for i in range(3)]
    expected = sum(wi * p for wi, p in zip(w, parts)) / int((targets != -100).sum())
    torch.testing.assert_close(weighted, expected, atol=1e-6, rtol=1e-6)


def test_hard_negative_weights_have_mean_one_and_favour_hard_examples():
    v = 7
    student = torch.full((2, v), -5.0)
    student[0, 3] = 5.0  # confident and right
    student[1, 2] = 5.0  # confident and wrong
    teacher = torch.zeros(2, v)
    w = hard_negative_weights(student, teacher, torch.tensor([3, 3]), alpha=2.0)
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    assert w[1] > w[0]
    assert torch.equal(hard_negative_weights(student, teacher, torch.tensor([3, 3]), alpha=0.0), torch.ones(2))


def test_head_loss_applies_hard_negative_weights_only_when_asked():
    hidden, weight, teacher, targets = _setup()
    head = LMHeadLoss(torch.nn.Linear(8, 11, bias=False))
    head._head.weight.data.copy_(weight)
    teacher_hidden = torch.randn(3, 2, 8)
    plain = head(hidden, targets, teacher_hidden)["kd"]
    again = head(hidden, targets, teacher_hidden, hard_negative_alpha=0.0)["kd"]
    sharp = head(hidden, targets, teacher_hidden, hard_negative_alpha=3.0)["kd"]
    assert torch.equal(plain, again)
    assert not torch.allclose(plain, sharp)
    sharp.backward()
    assert hidden.grad is not None and hidden.grad.isfinite().all()


# ---------------------------------------------------------------------------------------------------------------
# No full-precision copy of a frozen LM head in a training step (teacher logits at K positions, first-token
# accuracy, hard-negative weights, live teachers, diagnostics all go through kernels.lm_head_logits / _argmax).
# ---------------------------------------------------------------------------------------------------------------

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import kernels  # noqa: E402
from kernels import _lm_head  # noqa: E402


class _HeadUpcasts(TorchDispatchMode):
    """Per head: the most elements of any fp32/fp64 tensor an op makes directly from that head's storage (an
    upcast of the head, or of a chunk of it). Ops on other tensors do not count."""

    def __init__(self, heads: dict[str, torch.Tensor]):
        super().__init__()
        self.storage = {h.untyped_storage().data_ptr(): name for name, h in heads.items()}
        self.largest = dict.fromkeys(heads, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        names = {self.storage[t.untyped_storage().data_ptr()] for t in inputs
                 if t.untyped_storage().data_ptr() in self.storage}
        for t in tree_flatten(out)[0]:
            if names and isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64):
                for name in names:
                    self.largest[name] = max(self.largest[name], t.numel())
        return out


def test_the_probe_sees_a_full_precision_head_copy():
    head = torch.randn(300, 16).bfloat16()
    with _HeadUpcasts({"head": head}) as probe:
        torch.randn(2, 16) @ head.float().t()
    assert probe.largest["head"] == head.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_logits_and_argmax_match_the_dense_product(dtype, monkeypatch):
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 4096)  # 256-column chunks: the vocabulary walk is exercised
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 24, generator=g).to(dtype)
    weight = torch.randn(1000, 24, generator=g).to(dtype)
    weight[900] = weight[5]  # a tie across chunks: argmax keeps the first index, as torch.argmax does
    hidden[0] = weight[5].float().to(dtype) * 4
    expected = hidden.double() @ weight.double().t()
    logits = kernels.lm_head_logits(hidden, weight)
    assert logits.dtype == torch.float32 and logits.shape == (7, 1000)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(kernels.lm_head_argmax(hidden, weight), logits.argmax(-1))
    assert int(kernels.lm_head_argmax(hidden, weight)[0]) == 5


def test_training_step_makes_no_fp32_copy_of_a_bf16_head(tiny_dir, monkeypatch):
    """One LatentWire forward (diagnostics on) + backward with bf16 receivers and a live bf16 teacher, KD,
    hard-negative weights and the first-token term on: no op makes an fp32 tensor of more than one chunk of any
    head (CHUNK_BYTES of fp32, at least 256 rows), let alone a copy of the whole head."""
    from latentwire import config as C
    from latentwire import data as D
    from latentwire.model import LatentWire
    from latentwire.receivers import Receiver
    from latentwire.teachers import load_teachers
    from tests.conftest import ROOT, small_overrides

    cfg = C.load_config(ROOT / "configs" / "tiny.json", small_overrides(extra=[
        "receivers.0.dtype=bfloat16", "receivers.1.dtype=bfloat16", "receivers.0.teachers.0.path=tiny:llama",
        "curriculum.hard_negative_alpha=1.0", "curriculum.first_tok_weight_start=1.0",
        "curriculum.first_tok_weight_end=1.0"]))
    receivers = [Receiver.load(r, cfg.data.max_answer_tokens) for r in cfg.receivers]
    torch.manual_seed(0)
    model = LatentWire(cfg, receivers)
    model.attach_teachers(load_teachers(cfg, receivers, {}))
    batch = D.collate(D.read_file(str(D.EMBEDDED_SQUAD))[:2], {r.cfg.name: r.contract for r in receivers},
                      cfg.data.max_prompt_bytes, cfg.losses.k_tokens)
    heads = {name: r.model.get_output_embeddings().weight for name, r in model.receivers.items()}
    heads["teacher"] = model.teachers["llama"][0].forward.model.get_output_embeddings().weight
    assert all(h.dtype == torch.bfloat16 for h in heads.values())
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 64 * 1024)  # tiny heads (V=1000-1300) then span several chunks
    with _HeadUpcasts(heads) as probe:
        out = model(batch, 0, diagnose=True)
        out["loss"].backward()
    assert out["parts"]["kd/llama"] > 0 and "first_tok_acc/qwen" in out["parts"]
    for name, head in heads.items():
        one_chunk = max(_lm_head.CHUNK_BYTES // 4, _lm_head._MIN_CHUNK_COLS * head.shape[1])
        assert 0 < probe.largest[name] <= one_chunk, (name, probe.largest[name], head.shape)
        assert probe.largest[name] <= head.numel() // 2, (name, probe.largest[name], head.shape)
