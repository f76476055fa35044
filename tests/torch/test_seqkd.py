"""The `seqkd` objective's data: the teacher's answers replace the responses, generated once and
cached in the node folder."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdspec.plan.graph import Node  # noqa: E402
from kdspec.run.backend import NodeContext  # noqa: E402
from kdspec.spec.stages.seqkd import SeqKDStage  # noqa: E402
from kdspec_torch.batches import pair_rows  # noqa: E402
from kdspec_torch.generate import Sampling, generate, left_pad  # noqa: E402
from kdspec_torch.objectives import seqkd  # noqa: E402
from kdspec_torch.objectives.base import Setup  # noqa: E402
from kdspec_torch.objectives.ce import CrossEntropy  # noqa: E402

pytestmark = pytest.mark.torch

VOCAB, PAD, BOS, EOS = 20, 0, 1, 2
GREEDY = Sampling(max_new_tokens=6, temperature=0.0)


def tiny(d_model: int, seed: int) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


class Tokenizer:
    """The four ids and the decoder `prepare_data` uses."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(f"w{t}" for t in row) for row in rows]


PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]]


def data():
    return pair_rows(PROMPTS, [[3], [4, 4], [5], [6]], bos_id=BOS, eos_id=EOS, pad_id=PAD,
                     seq_len=12)


def setup(tmp_path, events: list) -> Setup:
    stage = SeqKDStage.model_validate(dict(
        name="seqkd", kind="seqkd", teacher="teacher", data="pairs", steps=1, batch_size=2,
        seq_len=12, generation={"max_new_tokens": 6, "temperature": 0.0}))
    node = Node("seqkd", "train", "seqkd", "seqkd", {"seed": 0, "teacher": {"stage": "t"}})
    ctx = NodeContext(node, None, None, tmp_path, tmp_path, tmp_path / "seqkd",  # type: ignore[arg-type]
                      events.append)
    return Setup(ctx, stage, Tokenizer(), tiny(8, seed=0), torch.device("cpu"))  # type: ignore[arg-type]


def test_row_prompts_are_bos_plus_prompt():
    assert seqkd.row_prompts(data()) == [[BOS, *p] for p in PROMPTS]


def test_teacher_responses_match_one_prompt_at_a_time():
    teacher = tiny(32, seed=1)
    prompts = [[BOS, *p] for p in PROMPTS]
    batched = seqkd.teacher_responses(teacher, prompts, GREEDY, pad_id=PAD, eos_id=EOS,
                                      batch_size=3)
    for prompt, answer in zip(prompts, batched, strict=True):
        ids, mask = left_pad([prompt], PAD)
        alone = generate(teacher, ids, mask, GREEDY, eos_token_id=EOS, pad_token_id=PAD)
        assert answer == alone.token_lists()[0]


def test_prepare_data_trains_on_cached_teacher_answers(tmp_path, monkeypatch):
    teacher, loads = tiny(32, seed=1), []

    def fake_load(ref, **kwargs):
        loads.append(ref)
        return teacher

    monkeypatch.setattr("kdspec_torch.models.load_model", fake_load)
    events: list = []
    s = setup(tmp_path, events)
    out = seqkd.prepare_data(s, data())
    answers = seqkd.teacher_responses(teacher, seqkd.row_prompts(data()), GREEDY, pad_id=PAD,
                                      eos_id=EOS, batch_size=2)
    expected = pair_rows(PROMPTS, answers, bos_id=BOS, eos_id=EOS, pad_id=PAD, seq_len=12)
    assert torch.equal(out.tokens, expected.tokens) and torch.equal(out.targets, expected.targets)
    assert len(loads) == 1 and any("answered 4 prompts" in e.message for e in events)

    cache = tmp_path / "seqkd" / seqkd.CACHE
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [line["response_ids"] for line in lines] == answers
    assert lines[0]["response"] == " ".join(f"w{t}" for t in answers[0])

    again = seqkd.prepare_data(s, data())  # from the cache: the teacher is not loaded again
    assert len(loads) == 1 and torch.equal(again.tokens, out.tokens)
    assert isinstance(seqkd.build(s), CrossEntropy)


def test_a_stale_cache_is_regenerated(tmp_path, monkeypatch):
    teacher = tiny(32, seed=1)
    monkeypatch.setattr("kdspec_torch.models.load_model", lambda ref, **kw: teacher)
    s = setup(tmp_path, [])
    cache = tmp_path / "seqkd" / seqkd.CACHE
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"prompt_ids": [BOS, 99], "response_ids": [3], "response": ""})
                     + "\n")
    out = seqkd.prepare_data(s, data())
    assert len(out) == len(PROMPTS)
    assert len(cache.read_text().splitlines()) == len(PROMPTS)
