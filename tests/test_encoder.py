"""Byte encoder: padding is masked (changes nothing), slots layout, latent dropout, adapter calibration."""

import torch

from latentwire.adapters import Adapter
from latentwire.config import AdapterConfig, EncoderConfig
from latentwire.encoder import ByteEncoder, bytes_to_tensor, drop_shared_slots


def _encoder():
    torch.manual_seed(0)
    return ByteEncoder(EncoderConfig(d_model=32, n_layers=2, n_heads=4, d_z=16, m_shared=4, m_private=2), 2, 128).eval()


def test_padding_changes_nothing():
    enc = _encoder()
    short, long = b"Context: a b c\nQuestion: q?\n", b"Context: " + b"x" * 90 + b"\nQuestion: longer one?\n"
    alone_ids, alone_mask = bytes_to_tensor([short], 128)
    batch_ids, batch_mask = bytes_to_tensor([short, long], 128)
    assert batch_ids.shape[1] > alone_ids.shape[1]
    with torch.no_grad():
        z_alone = enc(alone_ids, alone_mask)
        z_batch = enc(batch_ids, batch_mask)
    torch.testing.assert_close(z_batch[0], z_alone[0], atol=1e-5, rtol=1e-5)


def test_padding_bytes_do_not_leak():
    """Changing what sits in padded positions (they are masked) cannot change the latent."""
    enc = _encoder()
    ids, mask = bytes_to_tensor([b"abc", b"abcdefgh"], 128)
    other = ids.clone()
    other[0, 3:] = 65  # garbage where row 0 is padding
    with torch.no_grad():
        torch.testing.assert_close(enc(ids, mask)[0], enc(other, mask)[0], atol=1e-6, rtol=1e-6)


def test_slot_layout_shared_then_private():
    enc = _encoder()
    z = torch.arange(8).float().view(1, 8, 1).expand(1, 8, 16)
    assert enc.slots_for(z, 0)[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert enc.slots_for(z, 1)[0, :, 0].tolist() == [0, 1, 2, 3, 6, 7]


def test_latent_dropout_keeps_one_and_rescales():
    z = torch.ones(64, 6, 3)
    out = drop_shared_slots(z, 4, 0.01, torch.Generator().manual_seed(0))
    kept = (out[:, :4, 0] != 0).sum(1)
    assert kept.min() >= 1
    assert torch.equal(out[:, 4:], z[:, 4:])
    assert torch.allclose(out[:, :4][out[:, :4] != 0], torch.tensor(100.0))


def test_adapter_calibrates_each_example_to_target_rms():
    torch.manual_seed(0)
    adapter = Adapter(AdapterConfig(hidden=32), d_z=16, n_slots=6, hidden_size=24, target_rms=0.02)
    z = torch.randn(3, 6, 16) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    p = adapter(z)
    rms = p.pow(2).mean(dim=(1, 2)).sqrt()
    torch.testing.assert_close(rms, torch.full((3,), 0.02), atol=1e-5, rtol=1e-4)


def test_question_padding_marks_the_bytes_after_the_last_question_label():
    from latentwire.encoder import question_padding

    prompts = [b"Context: Question: is in the context\nQuestion: Who?\n", b"no label at all", b"x\nQuestion: "]
    ids, mask = bytes_to_tensor(prompts, 128)
    inside = ~question_padding(ids, mask)
    assert [bytes(ids[i][inside[i]].tolist()) for i in range(3)] == [b"Who?\n", b"no label at all", b"x\nQuestion: "]


def test_question_queries_and_local_mix_stay_padding_invariant_and_train():
    """The two encoder options: the prompt's padding changes nothing, and every new parameter gets a gradient."""
    torch.manual_seed(0)
    cfg = EncoderConfig(d_model=32, n_layers=1, n_heads=4, d_z=16, m_shared=4, m_private=1, question_queries=True,
                        local_mix=8)
    enc = ByteEncoder(cfg, n_receivers=2, max_bytes=128)
    short, long = b"Context: Ida Roth elk.\nQuestion: What does Ida Roth have?\n", b"x" * 100
    alone = enc(*bytes_to_tensor([short], 128))
    batched = enc(*bytes_to_tensor([short, long], 128))
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)
    batched.square().sum().backward()
    for name, p in enc.named_parameters():
        if name.startswith(("local.", "pooler.question")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_question_match_marks_the_context_bytes_that_end_a_question_ngram():
    """Exactly the context positions ending a 4-byte window the question repeats; never the question, never padding."""
    from latentwire.encoder import question_match, question_padding

    prompts = [b"Context: Ida Roth elk. Joe Lark fig.\nQuestion: What does Joe Lark have?\n",
               b"Context: x\nQuestion: y\n"]
    ids, mask = bytes_to_tensor(prompts, 128)
    feats = question_match(ids, mask, question_padding(ids, mask), [4, 9])
    assert feats.shape == (2, ids.shape[1], 2)
    text = prompts[0]
    marked = [i for i in range(len(text)) if feats[0, i, 0]]
    windows = {text[i - 3:i + 1] for i in marked}
    question = text[text.rindex(b"Question: ") + len(b"Question: "):]
    assert windows == {b" Joe", b"Joe ", b"oe L", b"e La", b" Lar", b"Lark", b"ark "}
    assert all(w in question for w in windows)
    assert all(i < text.index(b"\nQuestion") for i in marked)
    # 9-grams: " Joe Lark" and "Joe Lark " end at the k and the space after it; the second row shares nothing
    end = text.index(b" Joe Lark") + 8
    assert [i for i in range(len(text)) if feats[0, i, 1]] == [end, end + 1]
    assert feats[1].sum() == 0


def test_question_match_never_marks_the_question_label():
    """A question that repeats bytes of the template's own label ("...tion" against "\nQuestion: ") marks only
    the context's copy, never the label; the feature comes out in the dtype asked for (bf16 runs)."""
    from latentwire.encoder import question_match, question_padding

    text = b"Context: The station had a population of 9.\nQuestion: What was the population?\n"
    ids, mask = bytes_to_tensor([text], 128)
    feats = question_match(ids, mask, question_padding(ids, mask), [4], dtype=torch.bfloat16)
    assert feats.dtype == torch.bfloat16
    marked = [i for i in range(len(text)) if feats[0, i, 0]]
    label = text.index(b"\nQuestion: ")
    assert marked and all(i < label for i in marked)
    assert {text[i - 3:i + 1] for i in marked} >= {b"tion", b"popu", b"ulat"}  # "station" and "population"


def test_match_ngrams_stay_padding_invariant_and_their_vectors_train():
    torch.manual_seed(0)
    cfg = EncoderConfig(d_model=32, n_layers=1, n_heads=4, d_z=16, m_shared=4, m_private=1, match_ngrams=[3, 5])
    enc = ByteEncoder(cfg, n_receivers=2, max_bytes=128)
    short, long = b"Context: Ida Roth elk.\nQuestion: What does Ida Roth have?\n", b"x" * 100
    alone = enc(*bytes_to_tensor([short], 128))
    batched = enc(*bytes_to_tensor([short, long], 128))
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)
    batched.square().sum().backward()
    assert enc.match.shape == (2, 32) and (enc.match.grad.abs().sum(dim=1) > 0).all()
