"""The one decode loop: stop ids, padding of finished rows, no step after the last token; both generators use it.
MPlus.generate's decode steps (the read adapter folded into the weights, a static cache) against the layer path."""
import pytest
import torch

from mplus_lightning.eval import runtime
from mplus_lightning.model import decoding, mplus
from mplus_lightning.model.adapters import lora_modules
from mplus_lightning.model.decoding import decode_loop, pick_token

from .conftest import filled, random_ids


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


# ---- MPlus.generate's decode steps: adapter folded into the weights, static cache ---------------------------------
def recording_generate(model, monkeypatch, memory, prompt, new: int, **kwargs):
    """(ids, [per decode step: logits [B, V]]) of model.generate, greedy and never stopping early."""
    logits: list[torch.Tensor] = []

    def loop(first, step, max_new_tokens, **kw):
        def recorded(tokens, i):
            out = step(tokens, i)
            logits.append(out.clone())
            return out
        return decoding.decode_loop(first, recorded, max_new_tokens, **kw)

    with monkeypatch.context() as patched:
        patched.setattr(mplus, "decode_loop", loop)
        ids = model.generate(memory, prompt, new, eos_token_id=None, **kwargs)
    return ids, logits


class StaticShapesOnCpu(decoding.StaticDecoder):
    """The fixed-shape step that a CUDA graph captures (tensor inputs, masked whole cache), run eagerly on CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "static": True})


def layer_path(model, monkeypatch, memory, prompt, new: int):
    """Today's decode through the decoder layers (train mode; the tiny config has no LoRA dropout)."""
    model.train()
    try:
        return recording_generate(model, monkeypatch, memory, prompt, new)
    finally:
        model.eval()


def memory_read_whole(model):
    """A memory whose long-term part holds no more rows than a read retrieves (K0): every read retrieves all of them,
    so that a read of prompt + generated tokens attends to what the generation attended to."""
    mem = model.new_memory()
    for s in range(3):
        model.inject(mem, random_ids(16, seed=s + 1))
    assert 0 < len(mem.ltm) <= model.config.ltm_read_rows
    return mem


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static_shapes"])
def test_decode_with_the_folded_adapter_gives_the_layer_paths_tokens_and_logits(tiny_model, monkeypatch, static):
    if static:
        monkeypatch.setattr(mplus, "StaticDecoder", StaticShapesOnCpu)
    mem = memory_read_whole(tiny_model)
    prompt = random_ids(5, batch=2, seed=9)
    ref_ids, ref_logits = layer_path(tiny_model, monkeypatch, mem, prompt, 10)
    for fold in (True, False):
        ids, logits = recording_generate(tiny_model, monkeypatch, mem, prompt, 10, fold_adapter=fold)
        assert tiny_model._decoder.static is static
        assert torch.equal(ids, ref_ids), f"fold_adapter={fold}: other greedy tokens than the layer path"
        assert len(logits) == len(ref_logits) == 9
        for a, b in zip(logits, ref_logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and every step equals a read of the prompt and the tokens so far (no cache at all)
    for i, step_logits in enumerate(ref_logits):
        whole = tiny_model.read(mem, ref_ids[:, : 5 + i + 1], logits_to_keep=1)[:, -1]
        torch.testing.assert_close(step_logits, whole, rtol=1e-5, atol=1e-5)


def test_the_adapter_matters_and_a_weight_update_reaches_the_folded_copy(tiny_model, monkeypatch):
    mem = memory_read_whole(tiny_model)
    prompt = random_ids(5, seed=4)
    _, before = recording_generate(tiny_model, monkeypatch, mem, prompt, 4)
    lora_b = tiny_model.layers[1].mlp.up_proj.lora_B["read"].weight
    with torch.no_grad():
        lora_b.add_(torch.randn(lora_b.shape, generator=torch.Generator().manual_seed(5)))  # as an optimizer step
    _, after = recording_generate(tiny_model, monkeypatch, mem, prompt, 4)
    _, reference = layer_path(tiny_model, monkeypatch, mem, prompt, 4)
    assert not torch.allclose(after[0], before[0], atol=1e-3), "the read adapter's update changed nothing"
    for a, b in zip(after, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_decode_state_is_kept_between_calls_and_freed_on_request(tiny_model):
    mem = memory_read_whole(tiny_model)
    prompt = random_ids(5, seed=4)
    assert tiny_model.decode_state_bytes() == 0
    first = tiny_model.generate(mem, prompt, 6, eos_token_id=None)
    kept = tiny_model.decode_state_bytes()
    adapted = sum(m.base_layer.weight.numel() for layer in tiny_model.layers for m in lora_modules(layer)) * 4
    assert kept > adapted, "the folded copy of every adapted weight and the cache are kept"
    again = tiny_model.generate(mem, random_ids(7, seed=8), 5, eos_token_id=None)   # fits the same cache
    assert tiny_model.decode_state_bytes() == kept and again.shape == (1, 12)
    tiny_model.free_decode_state()
    assert tiny_model.decode_state_bytes() == 0
    assert torch.equal(tiny_model.generate(mem, prompt, 6, eos_token_id=None), first)
    unfolded = tiny_model.generate(mem, prompt, 6, eos_token_id=None, fold_adapter=False)
    assert torch.equal(unfolded, first)
    assert 0 < tiny_model.decode_state_bytes() < kept - adapted + 1, "fold_adapter=False keeps no folded copy"


def test_folding_computes_w_plus_scaled_b_a_and_leaves_the_module_alone(tiny_model):
    from mplus_lightning.model.adapters import READ, FoldedAdapters

    q = tiny_model.layers[0].self_attn.q_proj
    before = q.base_layer.weight.clone()
    folded = FoldedAdapters().projection(q, READ)
    expected = before + q.scaling[READ] * q.lora_B[READ].weight @ q.lora_A[READ].weight
    torch.testing.assert_close(folded.weight, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(q.base_layer.weight, before), "write passes keep the unfolded weights"
    x = torch.randn(3, q.in_features)
    q._active_adapter = [READ]
    torch.testing.assert_close(folded(x), q(x), rtol=1e-5, atol=1e-5)


def test_each_decode_step_with_fewer_than_k0_long_term_rows_equals_a_read_of_the_tokens_so_far(tiny_model,
                                                                                                  monkeypatch):
    # m < K0 long-term rows sit at positions 1+K0-m .. K0, so the new tokens continue at 1+K0+N+n whatever m is; the
    # logits are compared, not only the greedy tokens: a position shift can leave the argmax unchanged.
    model = tiny_model
    memory = filled(model, chunks=2)
    assert 0 < memory.ltm.size < model.config.ltm_read_rows
    prompt = random_ids(9, batch=2, seed=3)
    out, logits = recording_generate(model, monkeypatch, memory, prompt, 6)
    assert len(logits) == 5
    for i, step_logits in enumerate(logits):
        whole = model.read(memory, out[:, : 9 + i + 1], logits_to_keep=1)[:, -1]
        torch.testing.assert_close(step_logits, whole, rtol=1e-5, atol=1e-5)
