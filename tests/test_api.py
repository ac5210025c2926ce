"""Inference API: `from latentwire import Interlingua`; payloads are real wire bytes; answers equal evaluation's."""

import pytest

from latentwire import data as D
from latentwire import eval as E
from latentwire import wire
from tests.conftest import run_cli
from tests.helpers import eval_examples, make_checkpoint


@pytest.fixture(scope="module")
def lw(tiny_receivers, tmp_path_factory):
    from latentwire import Interlingua

    run = tmp_path_factory.mktemp("api") / "run"
    make_checkpoint(run, tiny_receivers)
    return Interlingua.from_checkpoint(run / "checkpoints" / "latest", device="cpu")


def test_import_stays_light():
    proc = run_cli(["-c", "import sys, latentwire; assert 'torch' not in sys.modules; "
                          "print(latentwire.Interlingua.__name__)"])
    assert proc.stdout.strip() == "Interlingua"


def test_encode_gives_one_real_payload_per_prompt(lw):
    prompts = [lw.prompt(ex.context, ex.question) for ex in eval_examples()]
    slots, dim = lw.model.encoder.n_slots, lw.cfg.encoder.d_z
    for precision in ("fp16", "int8", "int4"):
        payloads = lw.encode(prompts, precision=precision)
        assert len(payloads) == 3 and all(isinstance(p, bytes) for p in payloads)
        assert {len(p) for p in payloads} == {wire.payload_nbytes_bound(slots, dim, precision, lw.cfg.eval.group_size)}
        assert tuple(lw.decode(payloads).shape) == (3, slots, dim)
    with pytest.raises(ValueError, match="max_prompt_bytes"):
        lw.encode(["x" * (lw.max_prompt_bytes + 1)])
    with pytest.raises(TypeError):
        lw.encode(prompts[0])


def test_generate_matches_the_latent_evaluation_path(lw):
    examples = eval_examples()
    prompts = [D.prompt_text(ex, lw.max_prompt_bytes) for ex in examples]
    assert prompts == [lw.prompt(ex.context, ex.question) for ex in examples]
    payloads = lw.encode(prompts, precision="int8")  # three prompts, batches of two
    _, rows = E.evaluate(lw.model, examples, paths=["latent"], latency=False)
    for name in lw.receivers:
        answers = lw.generate(name, payloads, None, max_new_tokens=lw.cfg.eval.max_new_tokens)
        assert answers == [r["predictions"][name]["latent"] for r in rows]
    with_questions = lw.generate("qwen", payloads, [ex.question for ex in examples], max_new_tokens=2)
    assert len(with_questions) == 3 and all(isinstance(a, str) for a in with_questions)
    with pytest.raises(KeyError, match="unknown receiver"):
        lw.generate("gpt", payloads)
    with pytest.raises(wire.WireFormatError):
        lw.generate("llama", [payloads[0][:-1]])
