"""MemoryAugmentedLM: the memory prefix (gather, order, tags), masking, positions, generate, training.

The LMs are tiny, randomly initialised GPT-2 and Llama models built from configs (nothing is
downloaded). Their ``initializer_range`` is raised so that the prefix visibly moves the logits
and the projector can learn the toy task within a few dozen steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from memory_utils import random_documents, tiny_memory
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mllm.lm import MemoryAugmentedLM, MemoryProjector, train_projector

VOCAB, HIDDEN = 64, 32
LMS = ["gpt2", "llama"]


def tiny_lm(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "initializer_range": 0.2, "bos_token_id": None, "eos_token_id": None}
    common["pad_token_id"] = 0
    if kind == "gpt2":
        config = GPT2Config(n_layer=2, n_head=2, n_embd=HIDDEN, n_positions=128, **common)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def memory():
    """24 leaves, 6 parents, 2 top nodes: a beam of 3 leaves one invalid slot at the top."""
    docs = random_documents(torch.Generator().manual_seed(0), 10)
    memory = tiny_memory(docs, fanout=4, chunk_size=8)
    assert memory.tree.sizes() == [24, 6, 2]
    return memory


@pytest.fixture(params=LMS)
def model(request, memory):
    torch.manual_seed(1)
    return MemoryAugmentedLM(tiny_lm(request.param), memory, t=3)


QUERIES = [[5, 17, 200, 3, 99], [250, 1, 1, 42]]


def prompt(gen, batch=2, length=5):
    return torch.randint(1, VOCAB, (batch, length), generator=gen)


def left_padded(ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 1 of ``ids`` left padded by ``pad`` tokens (its last ``pad`` tokens dropped)."""
    mask = torch.ones_like(ids)
    ids = ids.clone()
    ids[1, pad:] = ids[1, :-pad].clone()
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


# ------------------------------------------------------------------------------------------ prefix
@pytest.mark.parametrize("kind", LMS)
def test_memory_embeddings_gather_coarse_to_fine_with_level_tags(kind, memory):
    torch.manual_seed(1)
    model = MemoryAugmentedLM(tiny_lm(kind), memory, t=3)
    emb, valid = model.memory_embeddings(QUERIES)
    result = memory.retrieve(QUERIES, t=3)
    levels = memory.num_levels
    assert emb.shape == (2, sum(ids.shape[1] for ids in result.ids), HIDDEN) == (2, 9, HIDDEN)
    assert emb.dtype == torch.float32 and valid.dtype == torch.bool
    assert torch.equal(valid, torch.cat([ids >= 0 for ids in result.ids], 1))
    assert not valid.all(), "the top level has 2 nodes for a beam of 3"

    projector = model.projector
    expected = []
    for j, ids in enumerate(result.ids):  # top -> bottom
        height = levels - j
        rows = memory.tree.emb[height - 1][ids.clamp(min=0)]
        tagged = projector.norm(rows + projector.level_tag.weight[height - 1])
        expected.append(projector.net(tagged) * (ids >= 0)[..., None])
    torch.testing.assert_close(emb, torch.cat(expected, 1))

    # The tag of height 1 reaches exactly the leaf slots (the last k).
    with torch.no_grad():
        projector.level_tag.weight[0] += 1.0
    moved = (model.memory_embeddings(QUERIES)[0] != emb).any(-1)
    assert moved[:, -3:].all() and not moved[:, :-3].any()


def test_max_levels_reads_the_finest_levels(memory):
    model = MemoryAugmentedLM(tiny_lm("gpt2"), memory, t=3, k=4, max_levels=2)
    emb, valid = model.memory_embeddings(QUERIES)
    assert emb.shape == (2, 3 + 4, HIDDEN) and valid.all()
    result = memory.retrieve(QUERIES, t=3, k=4)
    leaves = memory.tree.emb[0][result.ids[-1]]
    projector = model.projector
    torch.testing.assert_close(emb[:, 3:], projector.net(projector.norm(leaves + projector.level_tag.weight[0])))


def test_untrained_projector_is_small(model):
    emb, valid = model.memory_embeddings(QUERIES)
    tokens = model.lm.get_input_embeddings().weight
    assert emb[valid].norm(dim=-1).max() < 0.5 * tokens.norm(dim=-1).mean()


# ----------------------------------------------------------------------------------------- forward
def test_forward_shapes_and_labels_skip_memory_slots(model, gen):
    ids = prompt(gen)
    out = model(ids, memory_queries=QUERIES)
    m = out.logits.shape[1] - ids.shape[1]
    assert m == 9 and out.logits.shape == (2, 9 + 5, VOCAB)

    labels = ids.clone()
    labels[0, 2] = -100
    loss = model(ids, labels=labels, memory_queries=QUERIES).loss
    # Causal shift: position i predicts label i+1, so the last memory slot predicts prompt token 0.
    manual = F.cross_entropy(out.logits[:, m - 1 : -1].reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, manual)


def test_prefix_layout_invalid_slots_first_positions_count_attended(model, gen):
    ids, mask = left_padded(prompt(gen, length=6), pad=2)
    inputs = model.prepare_inputs(ids, attention_mask=mask, memory_queries=QUERIES)
    emb, valid = model.memory_embeddings(QUERIES)
    m = emb.shape[1]
    full_mask = inputs["attention_mask"]
    assert inputs["inputs_embeds"].shape == (2, m + 6, HIDDEN)
    assert torch.equal(full_mask[:, m:], mask)
    for row in range(2):
        n_invalid = int((~valid[row]).sum())
        assert n_invalid > 0 and not full_mask[row, :n_invalid].any() and full_mask[row, n_invalid:m].all()
        # The valid slots, in their coarse-to-fine order, follow the invalid ones.
        torch.testing.assert_close(inputs["inputs_embeds"][row, n_invalid:m], emb[row][valid[row]])
        attended = full_mask[row].bool()
        assert torch.equal(inputs["position_ids"][row][attended], torch.arange(int(attended.sum())))


def test_invalid_slots_and_left_padding_change_nothing(model, gen):
    """Each row equals an explicit run of the LM on its valid memory slots + its real tokens only."""
    ids, mask = left_padded(prompt(gen, length=6), pad=2)
    out = model(ids, attention_mask=mask, memory_queries=QUERIES).logits[:, -6:]
    emb, valid = model.memory_embeddings(QUERIES)
    assert not valid.all()
    token_emb = model.lm.get_input_embeddings()
    for row in range(2):
        real = ids[row][mask[row].bool()]
        sequence = torch.cat([emb[row][valid[row]], token_emb(real)])[None]
        reference = model.lm(inputs_embeds=sequence).logits[0, -real.numel() :]
        torch.testing.assert_close(out[row][mask[row].bool()], reference, atol=1e-5, rtol=1e-5)


def test_memory_content_changes_the_logits(model, memory, gen):
    ids = prompt(gen, batch=1)
    other = [[7, 7, 130, 131, 132, 9]]
    assert not torch.equal(memory.retrieve(QUERIES[:1], t=3).ids[-1], memory.retrieve(other, t=3).ids[-1])
    a = model(ids, memory_queries=QUERIES[:1]).logits[:, -5:]
    b = model(ids, memory_queries=other).logits[:, -5:]
    assert (a - b).abs().max() > 1e-4
    # Hiding the retrieved documents changes what is read, hence the logits.
    with memory.masked(memory.retrieve(QUERIES[:1], t=3).doc_ids(0)):
        c = model(ids, memory_queries=QUERIES[:1]).logits[:, -5:]
    assert (a - c).abs().max() > 1e-4


def test_gradients_reach_the_projector_only(model, gen):
    model.train()
    assert not model.lm.training, "a frozen LM stays in eval mode"
    ids = prompt(gen)
    model(ids, labels=ids, memory_queries=QUERIES).loss.backward()
    for name, param in model.projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in model.lm.parameters())
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"projector"}


def test_prompt_is_the_default_query_with_a_tokenizer(memory, gen):
    class Letters:  # LM token i <-> the byte 'A' + i (what the memory's byte tokenizer reads)
        all_special_ids = (0,)

        def decode(self, ids):
            return "".join(chr(65 + i) for i in ids)

    model = MemoryAugmentedLM(tiny_lm("llama"), memory, t=3, tokenizer=Letters())
    ids, mask = left_padded(prompt(gen), pad=2)
    texts = [Letters().decode([i for i in row if i]) for row in (ids * mask).tolist()]
    torch.testing.assert_close(
        model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask, memory_queries=texts).logits
    )


# ---------------------------------------------------------------------------------------- generate
def test_generate_matches_a_greedy_loop_over_forward(model, gen):
    ids, mask = left_padded(prompt(gen, length=6), pad=3)
    new = model.generate(ids, attention_mask=mask, memory_queries=QUERIES, max_new_tokens=4, do_sample=False)
    assert new.shape == (2, 4)
    again = model.generate(ids, attention_mask=mask, memory_queries=QUERIES, max_new_tokens=4, do_sample=False)
    assert torch.equal(new, again)
    for _ in range(3):
        step = model(ids, attention_mask=mask, memory_queries=QUERIES).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, step], 1), torch.cat([mask, torch.ones_like(step)], 1)
    assert torch.equal(new[:, :3], ids[:, -3:])


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", LMS)
def test_train_projector_learns_which_document_was_read(kind):
    docs = [f"code {c * 6} zone" for c in "QWXZ"]
    memory = tiny_memory(docs, fanout=4, chunk_size=8, t=2)
    torch.manual_seed(0)
    model = MemoryAugmentedLM(tiny_lm(kind), memory)
    # The prompt is the same for every example: only the memory tells the answers apart.
    examples = [(doc, [1, 2, 3], [10 + i]) for i, doc in enumerate(docs)] * 2
    losses = train_projector(model, examples, steps=30, lr=3e-2, batch_size=8)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert all(not p.requires_grad for p in model.lm.parameters())

    ids = torch.tensor([[1, 2, 3, 10 + i] for i in range(4)])
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    with torch.no_grad():
        right = model(ids, labels=labels, memory_queries=docs).loss
        shuffled = model(ids, labels=labels, memory_queries=docs[1:] + docs[:1]).loss
    assert right < shuffled


def test_train_projector_with_query_embeddings(memory):
    model = MemoryAugmentedLM(tiny_lm("gpt2"), memory, t=2)
    queries = memory.encode_queries(QUERIES)[:, 0]
    before = [p.detach().clone() for p in model.projector.parameters()]
    losses = train_projector(model, [(queries[0], [1, 2], [3, 4]), (queries[1], [], [5])], steps=2, batch_size=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.projector.parameters()))


# -------------------------------------------------------------------------------------------- errors
def test_bad_input_raises_clear_errors(memory, gen):
    lm = tiny_lm("gpt2")
    model = MemoryAugmentedLM(lm, memory)
    ids = prompt(gen)
    with pytest.raises(ValueError, match="memory_queries is required"):
        model(ids)
    with pytest.raises(ValueError, match="memory_queries has 1 queries but input_ids has 2 rows"):
        model(ids, memory_queries=QUERIES[:1])
    with pytest.raises(ValueError, match=r"query embeddings must be \[B, 16\]"):
        model(ids, memory_queries=torch.randn(2, 8))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(ids[0], memory_queries=QUERIES)
    with pytest.raises(ValueError, match="attention_mask is"):
        model(ids, attention_mask=ids[:, :2], memory_queries=QUERIES)
    with pytest.raises(ValueError, match="labels is"):
        model(ids, labels=ids[:, :2], memory_queries=QUERIES)
    with pytest.raises(ValueError, match="inputs_embeds is built"):
        model(ids, memory_queries=QUERIES, inputs_embeds=torch.zeros(2, 5, HIDDEN))
    with pytest.raises(ValueError, match="position_ids is built"):
        model.generate(ids, memory_queries=QUERIES, position_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="projector takes 8-wide embeddings but the memory's d_model is 16"):
        MemoryAugmentedLM(lm, memory, projector=MemoryProjector(8, HIDDEN, 8))
    with pytest.raises(ValueError, match="hidden size is 32"):
        MemoryAugmentedLM(lm, memory, projector=MemoryProjector(16, 48, 8))
    with pytest.raises(TypeError, match="memory must be a HierarchicalMemory"):
        MemoryAugmentedLM(lm, object())
    with pytest.raises(ValueError, match="max_levels must be >= 1"):
        MemoryAugmentedLM(lm, memory, max_levels=0)
    with pytest.raises(ValueError, match="examples is empty"):
        train_projector(model, [], steps=1)
    with pytest.raises(ValueError, match="no answer tokens"):
        train_projector(model, [(QUERIES[0], [1], [])], steps=1)
    with pytest.raises(ValueError, match=r"examples\[0\] must be"):
        train_projector(model, [(QUERIES[0], [1])], steps=1)


def test_gathered_prefix_equals_retrieval_and_reads_other_memories(model, memory, gen):
    ids = prompt(gen)
    gathered = model.gather(QUERIES)
    embeddings, heights, valid = gathered
    assert embeddings.shape == (2, 9, 16) and heights.tolist() == [3] * 3 + [2] * 3 + [1] * 3
    assert not embeddings.requires_grad and valid.dtype == torch.bool
    direct = model(ids, memory_queries=QUERIES).logits
    torch.testing.assert_close(model(ids, gathered=gathered).logits, direct)
    assert torch.equal(
        model.generate(ids, gathered=gathered, max_new_tokens=3, do_sample=False),
        model.generate(ids, memory_queries=QUERIES, max_new_tokens=3, do_sample=False),
    )
    # Another memory, passed explicitly, is what gets read.
    other = tiny_memory(random_documents(torch.Generator().manual_seed(9), 10), fanout=4, chunk_size=8)
    other_embeddings, _, _ = model.gather(QUERIES, other)
    assert not torch.equal(other_embeddings, embeddings)
    with pytest.raises(ValueError, match="not both"):
        model(ids, memory_queries=QUERIES, gathered=gathered)
    with pytest.raises(ValueError, match="gathered has 2 rows but input_ids has 1"):
        model(ids[:1], gathered=gathered)
    with pytest.raises(ValueError, match="gathered must be"):
        model(ids, gathered=(embeddings[0], heights, valid))
