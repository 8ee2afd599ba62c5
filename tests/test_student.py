import pytest
import torch

from toolchain.models import student as students
from toolchain.models.chat import IGNORE
from toolchain.training.batches import batches_for_epoch, collate
from toolchain.training.step import response_loss


def test_block_influence_scores_every_layer(tiny_llama):
    seqs = [[1, 5, 9, 13, 2], [3, 4, 5, 6, 7, 8]]
    scores = students.block_influence(tiny_llama, seqs)
    assert len(scores) == 6
    assert all(0.0 <= s <= 2.0 for s in scores)
    assert scores == students.block_influence(tiny_llama, seqs)  # deterministic


def test_influence_picks_the_layers_that_change_the_hidden_state(tiny_llama):
    # Zero a layer's output projections: it becomes the identity (residual only), influence 0.
    layer = students.decoder_layers(tiny_llama)[3]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    scores = students.block_influence(tiny_llama, [[1, 2, 3, 4, 5, 6]])
    assert scores[3] == pytest.approx(0.0, abs=1e-6)
    assert 3 not in students.choose_layers(6, 5, "influence", scores)


def test_choose_layers_even_and_explicit():
    assert students.choose_layers(30, 10, "even", None)[0] == 0
    assert students.choose_layers(30, 10, "even", None)[-1] == 29
    assert len(students.choose_layers(30, 10, "even", None)) == 10
    assert students.choose_layers(6, None, [4, 0, 2], None) == [0, 2, 4]
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        students.choose_layers(6, None, [9], None)
    assert students.choose_layers(6, None, "influence", None) == list(range(6))


def test_prune_keeps_a_working_tied_model(tiny_llama):
    pruned = students.prune(tiny_llama, [0, 2, 5])
    assert pruned.config.num_hidden_layers == 3
    assert [l.self_attn.layer_idx for l in students.decoder_layers(pruned)] == [0, 1, 2]
    assert students.embeddings_tied(pruned)
    assert len(students.decoder_layers(tiny_llama)) == 6  # the teacher is untouched
    out = pruned.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)  # KV cache indexes
    assert out.shape == (1, 7)
    assert students.parameter_count(pruned) < students.parameter_count(tiny_llama)


def test_loss_only_on_response_tokens(tiny_llama):
    ex = [([1, 2, 3, 4, 5], [IGNORE, IGNORE, IGNORE, 4, 5]), ([1, 2, 3], [IGNORE, IGNORE, 3])]
    batch = collate(ex, pad_id=0)
    loss, n = response_loss(tiny_llama, batch)
    assert n == 3
    # Same value as full-vocabulary logits + masked cross-entropy done the plain way.
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), batch["labels"][:, 1:].reshape(-1),
                                            ignore_index=IGNORE)
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)


def test_batches_are_a_function_of_seed_and_epoch():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10]
    a = batches_for_epoch(10, 3, seed=1, epoch=0, lengths=lengths)
    assert a == batches_for_epoch(10, 3, seed=1, epoch=0, lengths=lengths)
    assert a != batches_for_epoch(10, 3, seed=1, epoch=1, lengths=lengths)
    assert sorted(i for b in a for i in b) == list(range(10))


def test_lora_with_train_norms_trains_and_merges_the_norm_weights(tiny_llama):
    """distill.train_norms: RMSNorm weights train in full next to the adapters and survive merge_and_unload."""
    import copy

    import torch

    from toolchain.recipe import parse
    from toolchain.training.trainer import trainable

    cfg = parse({"name": "t", "teacher": "x.gguf", "data": {"train": ["t.jsonl"]},
                 "distill": {"method": "lora", "train_norms": True, "lora": {"r": 2, "alpha": 4}}}, "test")
    model = trainable(copy.deepcopy(tiny_llama), cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("input_layernorm" in n for n in trained) and any(n.endswith("norm.modules_to_save.default.weight") for n in trained)
    assert not any("embed_tokens" in n or ("q_proj.base_layer" in n) for n in trained)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 128, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    merged = model.merge_and_unload()
    before = tiny_llama.model.layers[0].input_layernorm.weight
    assert not torch.equal(merged.model.layers[0].input_layernorm.weight, before)
    off = {n for n, p in trainable(copy.deepcopy(tiny_llama), parse(
        {"name": "t", "teacher": "x.gguf", "data": {"train": ["t.jsonl"]}, "distill": {"method": "lora"}}, "test"
    )).named_parameters() if p.requires_grad}
    assert not any("norm" in n for n in off)
