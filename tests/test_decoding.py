"""The one decode loop: stop ids, padding of finished rows, no step after the last token; both generators use it."""
import torch

from mplus_lightning.eval import runtime
from mplus_lightning.model import decoding, mplus
from mplus_lightning.model.decoding import decode_loop, pick_token

from .conftest import random_ids


def scripted(rows: list[list[int]], vocab: int = 10):
    """Logits whose argmax per row follows `rows`, and a step that counts its calls."""
    def logits_at(i: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([r[i] for r in rows]), vocab).float()

    calls = []

    def step(tokens: torch.Tensor, i: int) -> torch.Tensor:
        calls.append((tokens[:, 0].tolist(), i))
        return logits_at(i + 1)

    return logits_at(0), step, calls


def test_rows_stop_at_a_stop_id_and_repeat_the_first_one():
    first, step, calls = scripted([[4, 2, 5, 6], [4, 5, 3, 6]])
    out = decode_loop(first, step, 4, stop_ids=(2, 3))
    assert out.tolist() == [[4, 2, 2], [4, 5, 3]], "row 0 pads with stop_ids[0] once finished; all done -> stop"
    assert [i for _, i in calls] == [0, 1], "no step after the tokens that finished every row"


def test_without_stop_ids_every_token_is_generated_and_the_last_is_not_fed_back():
    first, step, calls = scripted([[1, 2, 3]])
    assert decode_loop(first, step, 3).tolist() == [[1, 2, 3]]
    assert calls == [([1], 0), ([2], 1)]
    assert decode_loop(first, step, 0).shape == (1, 0)


def test_sampling_draws_from_the_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).expand(200, 4)
    draws = pick_token(logits, do_sample=True, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
    assert pick_token(logits).tolist() == [1] * 200


def test_model_generate_and_the_window_baseline_share_the_loop(tiny_model, monkeypatch):
    used = []

    def counting(*args, **kwargs):
        used.append(kwargs.get("stop_ids"))
        return decoding.decode_loop(*args, **kwargs)

    monkeypatch.setattr(mplus, "decode_loop", counting)
    monkeypatch.setattr(runtime, "decode_loop", counting)
    mem = tiny_model.new_memory()
    tiny_model.inject(mem, random_ids(16, seed=1))
    tiny_model.generate(mem, random_ids(5), max_new_tokens=3)
    runtime.Backbone(tiny_model).generate(random_ids(5)[0].tolist(), 3)
    assert len(used) == 2
