"""The paged KV cache: page bookkeeping on the host, and generation equal to the contiguous
cache's token for token (greedy) while pages are shared, copied on write, spilled to host
memory and paged out and back in."""
import time

import numpy as np
import pytest

from lmjax.generate.decoder import Decoder, LaneRequests
from lmjax.generate.engine import LaneEngine, Request
from lmjax.generate.pages import CacheFull, PagePool
from test_decoder import decode_all, random_model
from test_engine import CALL, FMT, PAD_TO, TOK, model_and_params, naive_dialog  # noqa: F401 (a fixture)

# --- the pool alone ---------------------------------------------------------------------------


def fake_device_pool(n_pages=6, page_size=4, lanes=3, per_lane=4):
    """A pool whose pages' "content" is a dict the test fills, read back when a page spills."""
    pool = PagePool(n_pages, page_size, lanes, per_lane)
    content = {}
    pool.read_page = lambda page: content[page]
    return pool, content


def test_full_pages_of_a_common_prefix_are_shared_and_the_rest_is_private():
    pool, _ = fake_device_pool(n_pages=8)
    a = list(range(10))  # pages [0..3] [4..7] and 2 tokens of a third
    assert pool.share_prefix(0, a) == 0
    pool.prepare_write(0, 0, 10)
    pool.wrote(0, 0, a)
    assert len(pool.by_key) == 2  # the two full pages
    b = a[:8] + [99, 98]
    assert pool.share_prefix(1, b) == 8
    assert list(pool.table[1, :2]) == list(pool.table[0, :2]) and pool.refs[pool.table[0, 0]] == 2
    pool.prepare_write(1, 8, 10)
    assert pool.table[1, 2] != pool.table[0, 2]
    # a prompt that is exactly the shared pages still leaves its last token to prefill
    assert pool.share_prefix(2, a[:8]) == 4
    # a prompt that differs inside the first page shares nothing
    assert pool.share_prefix(2, [5] + a[1:]) == 0


def test_a_lane_rewinding_into_a_shared_page_gets_its_own_copy():
    pool, _ = fake_device_pool(n_pages=8)
    a = list(range(9))
    pool.share_prefix(0, a)
    pool.prepare_write(0, 0, 9)
    pool.wrote(0, 0, a)
    pool.share_prefix(1, a)  # shares pages 0 and 1 of lane 0
    pool.prepare_write(1, 8, 9)
    pool.wrote(1, 8, a[8:])
    shared = int(pool.table[0, 1])
    pool.prepare_write(1, 6, 9)  # lane 1 rewinds to slot 6, inside the shared second page
    assert pool.table[1, 1] != shared and pool.table[0, 1] == shared
    assert pool.pop_work()[0] == [(shared, int(pool.table[1, 1]))]  # copy-on-write
    assert pool.refs[shared] == 1 and pool.history[1] == a[:6]
    # lane 0 alone owns its second page now: rewinding it only unregisters the page
    pool.prepare_write(0, 5, 9)
    assert pool.table[0, 1] == shared and shared not in pool.key_of and pool.pop_work()[0] == []


def test_evicted_prefix_pages_spill_to_the_host_and_come_back():
    pool, content = fake_device_pool(n_pages=3, page_size=4, lanes=2, per_lane=3)
    a = list(range(12))
    pool.share_prefix(0, a)
    pool.prepare_write(0, 0, 12)
    pool.wrote(0, 0, a)
    for i, page in enumerate(pool.table[0]):
        content[int(page)] = f"page {i} of a"
    pool.release(0)  # its three full pages stay cached
    assert pool.available() == 3 and len(pool.cached) == 3
    b = [7] * 8
    pool.share_prefix(1, b)
    pool.prepare_write(1, 0, 8)  # takes the two least recently used: a's first pages spill
    assert sorted(pool.host.values()) == ["page 0 of a", "page 1 of a"]
    pool.release(1)
    pool.share_prefix(0, a + [1])  # a comes back: two pages from the host, one from the device
    assert pool.history[0] == a and pool.table[0, 2] < pool.n_pages
    restored = dict(pool.pop_work()[1])
    assert sorted(restored.values()) == ["page 0 of a", "page 1 of a"]
    assert {int(pool.table[0, 0]), int(pool.table[0, 1])} == set(restored)
    with pytest.raises(CacheFull):
        pool.prepare_write(1, 0, 12)


# --- generation: paged equals contiguous ------------------------------------------------------


N_TREE_PAGES = 30  # too few for the tree's turns without evicting


def greedy(decoder, params, prompts, n_new=24):
    return decode_all(decoder, params, prompts, n_new)


def test_a_dialog_tree_decodes_the_same_paged_as_contiguous_while_sharing_pages():
    """Turn 1 for three dialogs with one system prompt, then two branches of each dialog's next
    turn in a pool too small to keep everything: shared, evicted to the host and restored
    pages give the contiguous cache's tokens."""
    model, params = random_model()
    rng = np.random.default_rng(0)
    system = rng.integers(1, 64, 37).tolist()
    turn1 = [system + rng.integers(1, 64, n).tolist() for n in (3, 9, 17)]
    contiguous = Decoder(model, 3, 256, chunk=8)
    paged = Decoder(model, 3, 256, chunk=8, page_size=8, n_pages=40)
    answers = greedy(contiguous, params, turn1)
    assert greedy(paged, params, turn1) == answers
    shared_pages = 37 // 8
    assert all(paged.pages.refs[page] == 3 for page in paged.pages.table[0, :shared_pages])
    branches = [turn1[i] + answers[i] + rng.integers(1, 64, 5 + 4 * j).tolist() for i in range(3) for j in range(2)]
    # the whole tree through one pool: later turns find the earlier turns' pages
    tree = Decoder(model, 3, 256, chunk=8, page_size=8, n_pages=N_TREE_PAGES)
    requests = LaneRequests.empty(3).replace(max_new=np.full(3, 24, np.int32))
    state = tree.init_state()
    for group in (turn1, branches[:3], branches[3:]):
        state, first = tree.prefill(params, state, group, np.zeros(3, np.int32), requests, prompt=[True] * 3, reset=[True] * 3)
        out = [[int(first[b])] for b in range(3)]
        while np.asarray(state.active).any():
            state, tokens, counts = tree.decode(params, state, requests)
            for b in range(3):
                out[b] += tokens[b, : counts[b]].tolist()
        assert out == greedy(contiguous, params, group)
    # the pool was too small: earlier pages went to the host and came back
    assert tree.pages.counts["spilled"] > 0 and tree.pages.counts["restored"] > 0, tree.pages.counts


def test_a_rewound_lane_leaves_the_lane_it_shares_pages_with_unchanged():
    model, params = random_model()
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, 64, 30).tolist()
    requests = LaneRequests.empty(2).replace(max_new=np.full(2, 10, np.int32))
    results = []
    for decoder in (Decoder(model, 2, 128, chunk=4), Decoder(model, 2, 128, chunk=4, page_size=8)):
        state = decoder.init_state()
        state, _ = decoder.prefill(params, state, [prompt, prompt], np.zeros(2, np.int32), requests,
                                   prompt=[True, True], reset=[True, True])
        # lane 1 rewinds to slot 12 (inside a page it shares with lane 0) and writes other tokens
        state, _ = decoder.prefill(params, state, [[], [5, 6, 7]], np.asarray([0, 12], np.int32), requests,
                                   reset=[False, True])
        out = [[], []]
        while np.asarray(state.active).any():
            state, tokens, counts = decoder.decode(params, state, requests)
            for b in range(2):
                out[b] += tokens[b, : counts[b]].tolist()
        results.append(out)
    assert results[0] == results[1]


def test_bad_paging_settings_are_clear_errors():
    model, _ = random_model()
    with pytest.raises(ValueError, match="multiple of page_size"):
        Decoder(model, 2, 100, page_size=16)
    from lmjax.models.rnn import RNN, RNNConfig

    rnn = RNN(RNNConfig(vocab_size=64, dim=16, n_layers=1))
    with pytest.raises(ValueError, match="needs a transformer"):
        Decoder(rnn, 2, 64, page_size=16)


# --- the engine: admission, page-out while a tool runs ----------------------------------------


@pytest.mark.parametrize("n_pages", [pytest.param(36, marks=pytest.mark.slow), 10])  # no page-out: slow run
def test_engine_lanes_waiting_on_tools_are_paged_out_and_back_with_the_same_tokens(model_and_params, n_pages):
    """A shared system prompt, tool calls of different lengths; with 10 pages of 8 slots (less
    than one lane's whole cache per lane) waiting lanes must be paged out for the others."""
    model, params = model_and_params
    system = TOK.encode("You are a helpful database assistant. ")
    prompts = [system + TOK.encode(t) for t in ("Hi", "When was Ada born?", "x" * 7, "Where?", "Tell me")]

    def tool(query):
        time.sleep(0.05 * (len(query) % 4))
        return f"r{len(query) % 7}"

    decoder = Decoder(model, 3, PAD_TO, stop_ids=FMT.stop_ids, chunk=3, page_size=8, n_pages=n_pages)
    engine = LaneEngine(decoder, params, TOK, tool=tool)
    completions = engine.generate([Request(p, max_new_tokens=14, id=i) for i, p in enumerate(prompts)])
    assert sum(len(c.tool_calls) for c in completions) >= 3
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == naive_dialog(model, params, prompt, tool, 14)
    if n_pages == 10:
        assert engine.stats["page_outs"] >= 1 and engine.stats["page_ins"] == engine.stats["page_outs"]
    else:
        assert engine.stats["page_outs"] == 0
    assert decoder.pages.held(0) == decoder.pages.held(1) == decoder.pages.held(2) == 0  # all given back


def test_a_paged_engine_serves_more_lanes_than_the_same_memory_holds_contiguously(model_and_params):
    """16 dialogs with a 64-token system prompt in the memory of 4 contiguous lanes of 96 slots
    (48 pages of 8): shared prefix pages let all 16 run at once."""
    model, params = model_and_params
    system = TOK.encode("System: answer briefly and look facts up in the database. ")[:56] + [ord("a")] * 8
    prompts = [system + TOK.encode(f"Q{i}?") for i in range(16)]
    decoder = Decoder(model, 16, PAD_TO, stop_ids=FMT.stop_ids, chunk=4, page_size=8, n_pages=4 * PAD_TO // 8)
    engine = LaneEngine(decoder, params, TOK)
    completions = engine.generate([Request(p, max_new_tokens=8, id=i) for i, p in enumerate(prompts)])
    assert engine.stats["prefills"] == 1  # every dialog admitted in the first round
    contiguous = LaneEngine(Decoder(model, 16, PAD_TO, stop_ids=FMT.stop_ids, chunk=4), params, TOK)
    assert [c.tokens for c in completions] == [c.tokens for c in contiguous.generate(
        [Request(p, max_new_tokens=8, id=i) for i, p in enumerate(prompts)])]



# --- the Pallas paged-attention kernel (interpret mode on CPU) -------------------------------


def test_the_paged_decode_kernel_equals_attention_over_the_gathered_slots():
    """jax's GPU paged-attention kernel, run in interpret mode, through lmjax's wrapper: one
    query per lane over its first `length` slots, read through a shuffled page table."""
    import jax.numpy as jnp

    from lmjax.kernels.paged_attention import paged_decode_attention
    from lmjax.models.attention import xla_attention

    B, H, K, D, P, per_lane = 3, 4, 2, 16, 4, 6
    n_pages = B * per_lane + 2
    rng = np.random.default_rng(2)
    table = rng.permutation(n_pages)[: B * per_lane].reshape(B, per_lane).astype(np.int32)
    table[1, 4:] = n_pages  # lane 1 holds 4 pages only ("no page" after them)
    lengths = np.asarray([23, 13, 1], np.int32)
    k_pages, v_pages = (rng.normal(size=(K, n_pages, P, D)).astype(np.float32) for _ in range(2))
    q = rng.normal(size=(B, H, D)).astype(np.float32)
    got = paged_decode_attention(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(table),
                                 jnp.asarray(lengths), backend="interpret")
    safe = np.where(table < n_pages, table, 0)
    k_slots = k_pages[:, safe].transpose(1, 2, 3, 0, 4).reshape(B, per_lane * P, K, D)
    v_slots = v_pages[:, safe].transpose(1, 2, 3, 0, 4).reshape(B, per_lane * P, K, D)
    mask = np.arange(per_lane * P)[None, None, :] < lengths[:, None, None]
    want = xla_attention(jnp.asarray(q[:, None]), jnp.asarray(k_slots), jnp.asarray(v_slots), jnp.asarray(mask))[:, 0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_pallas_attention_decodes_from_the_pages_with_the_xla_paths_tokens():
    """A model configured with attention=pallas decodes through the paged kernel (prefill
    chunks run xla): the greedy tokens of the XLA gather path, shared prefixes included."""
    import dataclasses

    from test_decoder import CFG

    model, params = random_model()
    pallas_model, _ = random_model(dataclasses.replace(CFG, attention="pallas"))
    rng = np.random.default_rng(3)
    system = rng.integers(1, 64, 20).tolist()
    prompts = [system + [5, 6], system + [7], rng.integers(1, 64, 9).tolist()]
    xla = greedy(Decoder(model, 3, 64, chunk=4, page_size=8), params, prompts, n_new=10)
    assert greedy(Decoder(pallas_model, 3, 64, chunk=4, page_size=8), params, prompts, n_new=10) == xla
