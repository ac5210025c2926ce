"""Receivers and the prefix contract: t=0 alignment, one pass = K passes, generation = training sequence."""

import pytest
import torch

import kernels
from latentwire.config import ReceiverConfig
from latentwire.receivers import ContractError, PrefixContract
from tests.conftest import no_registry


def _merging_tokenizer():
    """A BPE tokenizer with no pre-tokenizer, trained so that merges cross the anchor/answer boundary."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator(["Answer: Paris"] * 50, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_alignment_check_is_a_hard_error(tiny_receivers):
    PrefixContract(tiny_receivers[0].tokenizer, "Answer:")  # byte-level BPE splits before " Paris": aligned
    with pytest.raises(ContractError, match="t=0 alignment fails for answer 'Paris'"):
        PrefixContract(_merging_tokenizer(), "Answer:")


def test_bos_policy(tiny_receivers):
    llama, qwen = tiny_receivers
    assert llama.contract.latent_prefix_ids()[0] == llama.tokenizer.bos_token_id
    assert qwen.contract.latent_prefix_ids() == qwen.contract.anchor_ids
    never = PrefixContract(llama.tokenizer, "Answer:", "never")
    assert never.latent_prefix_ids() == never.anchor_ids
    with pytest.raises(ContractError, match="has no BOS"):
        PrefixContract(qwen.tokenizer, "Answer:", "always")


def test_answer_ends_with_eos_and_never_targets_bos(tiny_receivers):
    for r in tiny_receivers:
        ids = r.contract.answer_ids("Denver Broncos")
        assert ids[-1] == r.contract.eos_id
        assert r.tokenizer.bos_token_id not in ids[:-1] if r.tokenizer.bos_token_id is not None else True


def test_k_token_one_pass_equals_k_separate_passes(tiny_receivers):
    """Hidden states gathered at K positions from ONE teacher-forced pass give the same CE as K forward passes
    that each see only the prefix up to the token they predict."""
    torch.manual_seed(0)
    for r in tiny_receivers:
        c = r.contract
        k = 4
        answer = c.answer_ids("the Denver Broncos of 1990")
        assert len(answer) > k
        suffix = torch.tensor([c.latent_prefix_ids() + answer])
        prefix = torch.randn(1, 5, r.hidden_size) * r.embed_rms
        start = len(c.latent_prefix_ids())
        hidden = r.latent_pass(prefix, suffix, torch.ones_like(suffix), start, k)
        weight = r.model.get_output_embeddings().weight
        targets = torch.tensor(answer[:k])
        one_pass = kernels.k_token_cross_entropy(hidden[0], weight, targets)
        separate = []
        for j in range(k):
            seq = torch.cat([prefix, r.embed(suffix[:, : start + j])], dim=1)
            logits = r.model(inputs_embeds=seq).logits[0, -1]
            separate.append(torch.nn.functional.cross_entropy(logits.unsqueeze(0), targets[j:j + 1]))
        torch.testing.assert_close(one_pass, torch.stack(separate).mean(), atol=1e-5, rtol=1e-5)


def test_generation_reads_the_training_sequence(tiny_receivers):
    """The first greedy token from [P][BOS?][anchor] is the argmax the training pass sees at answer position 0."""
    torch.manual_seed(1)
    for r in tiny_receivers:
        c = r.contract
        prefix = torch.randn(2, 5, r.hidden_size) * r.embed_rms
        tail = torch.tensor([c.latent_prefix_ids()] * 2)
        embeds = torch.cat([prefix, r.embed(tail)], dim=1)
        generated = r.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                     max_new_tokens=1, do_sample=False, pad_token_id=c.pad_id)
        answer = torch.tensor([c.latent_prefix_ids() + [0, c.eos_id]] * 2)
        hidden = r.latent_pass(prefix, answer, torch.ones_like(answer), len(c.latent_prefix_ids()), 1)
        argmax = (hidden[:, 0] @ r.model.get_output_embeddings().weight.t()).argmax(-1)
        assert generated[:, -1].tolist() == argmax.tolist()


def test_k_token_one_pass_equals_k_passes_on_a_padded_batch(tiny_receivers):
    """Several rows with different answer lengths (shorter and longer than K), right-padded into one batch: each
    row's K-token CE from the ONE batched pass equals the mean over K separate unpadded passes of that row alone."""
    from latentwire.data import _pad

    torch.manual_seed(3)
    k = 5
    for r in tiny_receivers:
        c = r.contract
        answers = [c.answer_ids(a) for a in ("the", "the Denver Broncos of 1990 and 1991", "Zürich")]
        assert min(map(len, answers)) < k < max(map(len, answers))
        start = len(c.latent_prefix_ids())
        suffix, mask = _pad([c.latent_prefix_ids() + a for a in answers], c.pad_id)
        prefix = torch.randn(len(answers), 5, r.hidden_size) * r.embed_rms
        hidden = r.latent_pass(prefix, suffix, mask, start, k)  # (B, K, H)
        weight = r.model.get_output_embeddings().weight
        for i, answer in enumerate(answers):
            n = min(k, len(answer))
            batched = kernels.k_token_cross_entropy(hidden[i, :n], weight, torch.tensor(answer[:n]))
            separate = []
            for j in range(n):
                ids = torch.tensor([c.latent_prefix_ids() + answer[:j]])
                seq = torch.cat([prefix[i:i + 1], r.embed(ids)], dim=1)
                logits = r.model(inputs_embeds=seq).logits[0, -1]
                separate.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor(answer[j:j + 1])))
            torch.testing.assert_close(batched, torch.stack(separate).mean(), atol=1e-5, rtol=1e-5)


def test_generate_stops_at_eos_or_max_new_tokens_only(tiny_receivers):
    """Greedy decoding stops exactly at EOS (per row, EOS excluded) or at max_new_tokens: a hook on the LM head
    makes EOS the argmax of row 0 at its third new token; row 1 never sees it and runs to the cap."""
    r = tiny_receivers[0]
    c = r.contract
    ids = torch.tensor([c.text_prefix_ids("Context: x\nQuestion: y\n")] * 2)
    free = r.generate(torch.ones_like(ids), 5, input_ids=ids)
    assert [len(row) for row in free] == [5, 5] and c.eos_id not in free[0]  # no EOS: runs to the cap
    calls = {"n": 0}

    def force_eos(module, args, logits):
        calls["n"] += 1
        if calls["n"] == 3:  # prefill gives token 1, decode steps give tokens 2, 3, ...
            logits = logits.clone()
            logits[0, -1, c.eos_id] = logits.abs().max() * 10 + 1
        return logits

    handle = r.model.get_output_embeddings().register_forward_hook(force_eos)
    try:
        out = r.generate(torch.ones_like(ids), 5, input_ids=ids)
    finally:
        handle.remove()
    assert out[0] == free[0][:2]  # the two tokens before the forced EOS, EOS excluded
    assert out[1] == free[1]  # the other row does not stop with it
    assert [len(row) for row in r.generate(torch.ones_like(ids), 3, input_ids=ids)] == [3, 3]


def test_missing_model_path_is_named(tmp_path):
    from latentwire.receivers import Receiver

    with pytest.raises(FileNotFoundError, match="nowhere"):
        Receiver.load(ReceiverConfig(name="x", path=str(tmp_path / "nowhere")), 8)


def test_hub_names_resolve_through_the_hub_before_the_tiny_prefix(monkeypatch, tmp_path):
    """`tiny:llama3` starts with `tiny:` but is a hub name: it must reach latentwire.hub, never the tiny builder."""
    from latentwire import hub, receivers

    asked = []

    def fake_resolve(name, cache=None):
        asked.append(name)
        if name not in hub.NAMES:
            raise hub.HubError(f"unknown hub name {name!r}; known: {', '.join(hub.NAMES)}")
        return tmp_path / hub.NAMES[name].slug

    def no_tiny_build(root):
        raise AssertionError("a hub name reached the tiny builder")

    monkeypatch.setattr(hub, "resolve", fake_resolve)
    monkeypatch.setattr("latentwire.tiny.build_tiny_receivers", no_tiny_build)
    names = ["tiny:llama3", "tiny:qwen2.5", "real:smollm2-135m", "real:qwen2.5-0.5b"]
    assert [receivers.resolve_model_path(n) for n in names] == [str(tmp_path / hub.NAMES[n].slug) for n in names]
    assert asked == names
    assert receivers.resolve_model_path("/models/llama") == "/models/llama"
    with pytest.raises(FileNotFoundError, match=r"receiver path 'real:typo'.*unknown hub name 'real:typo'"):
        receivers.resolve_model_path("real:typo")


def test_hub_names_load_as_receiver_and_teacher_paths():
    """`receivers[].path` and a teacher path given as hub names load (tiny:qwen2.5: the real Qwen2.5 tokenizer),
    with the receiver's `chat_template` switch reaching its contract."""
    from latentwire import hub
    from latentwire.config import TeacherConfig
    from latentwire.receivers import Receiver
    from latentwire.teachers import build_live_teacher

    try:
        hub.resolve("tiny:qwen2.5")
    except hub.DownloadError as err:
        no_registry("the tokenizer of tiny:qwen2.5", err)
    cfg = ReceiverConfig(name="qwen", path="tiny:qwen2.5")
    plain = Receiver.load(cfg, 8)
    assert plain.contract.anchor == "Answer:" and plain.model.config.vocab_size == 151936
    cfg.chat_template = True  # the field latentwire.config.ReceiverConfig carries
    chat = Receiver(cfg, plain.model, plain.tokenizer, 8)
    assert chat.contract.chat_template and chat.contract.anchor == "<|im_end|>\n<|im_start|>assistant\n"
    teacher = build_live_teacher(plain, TeacherConfig(path="tiny:qwen2.5"), {}, "receivers.0.teachers.0")
    assert teacher.path == "tiny:qwen2.5"
