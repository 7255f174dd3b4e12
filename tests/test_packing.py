"""The fast path (packed pairs, prompt shared) computes TRL's numbers: layout and mask by hand, per-token
log-probs equal to DPOTrainer's padded path on every data format, and whole runs with the same losses."""

import inspect
import json
import random
import re

import pytest
import torch
from conftest import rows_in_format, write_jsonl

from dpolab import packing
from dpolab.cli import main

TOLERANCE = 1e-5  # fp32: the packed and padded computations differ only in summation order inside attention
# sequence sums of ~100 nats: 1e-5 is one unit in float32's last place there, which another CPU's kernels may round
SUMS = {"abs": TOLERANCE, "rel": 1e-6}


def test_layout_by_hand():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]},
        {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8, 9, 10]},
    ]
    batch = packing.pack_batch(examples, max_length=4, pad_token_id=0)
    # row: prompt_1 chosen_1 rejected_1 | prompt_2 chosen_2 rejected_2, padded to a multiple of 64
    assert batch["packed_input_ids"][0, :11].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert batch["packed_input_ids"].shape == (1, 64)
    assert batch["packed_position_ids"][0, :10].tolist() == [
        0,
        1,
        2,
        3,
        2,
        0,
        1,
        1,
        2,
        3,
    ]  # answers continue the prompt
    assert batch["packed_pair"][0, :11].tolist() == [0] * 5 + [1] * 5 + [packing.PAD_PAIR]
    assert batch["packed_segment"][0, :10].tolist() == [0, 0, 1, 1, 2, 0, 1, 2, 2, 2]
    # TRL's padded layout, chosen rows first; max_length 4 cuts the second rejected answer to 3 tokens
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 10]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1]]
    # where each padded token sits in the row; 64 (past the row) reads the zero row
    assert batch["packed_gather_index"].tolist() == [[0, 1, 2, 3], [5, 6, 64, 64], [0, 1, 4, 64], [5, 7, 8, 9]]
    # each answer token TRL's head scores: the packed position predicting it (a prompt's last token predicts both
    # first answer tokens), the token, and its place in TRL's [4, 3] log-prob layout, row by row
    assert batch["packed_answer_index"].tolist() == [1, 2, 5, 1, 5, 7, 8]
    assert batch["packed_answer_labels"].tolist() == [3, 4, 7, 5, 8, 9, 10]
    assert batch["packed_answer_slot"].tolist() == [0 * 3 + 1, 0 * 3 + 2, 1 * 3 + 0, 2 * 3 + 1, 3 * 3 + 0, 3 * 3 + 1,
                                                    3 * 3 + 2]  # fmt: skip


def test_the_packed_row_length_by_setting():
    assert packing.row_multiple(False, None) == 64
    assert packing.row_multiple(True, None) == 64  # compiled with dynamic shapes: any length runs the same graph
    assert packing.row_multiple(True, "reduce-overhead") == 512  # CUDA graphs: one recording per row length
    assert packing.row_multiple(False, "reduce-overhead") == 64  # the mode alone compiles nothing
    assert packing.row_multiple(True, "reduce-overhead", 128) == 128  # TRL's pad_to_multiple_of, where set, wins
    # rows of up to 8 pairs under 2 x 1024 tokens each, rounded to 512: 16,384 / 512 lengths
    assert packing.row_lengths_at_most(8, 1024, 512) == 32
    assert packing.row_lengths_at_most(3, 100, 64) == 10  # 600 / 64 = 9.4, the last one partly filled
    assert packing.row_lengths_at_most(8, None, 512) is None  # no max_length: no bound


def test_the_fast_path_pads_its_row_to_trls_pad_to_multiple_of(tmp_path, tiny_config, tiny_model_dir):
    from dpolab import train
    from dpolab.config import parse_train_args
    from dpolab.models import load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 8))
    config = parse_train_args(["--config", str(tiny_config(data, max_steps=1)), "--pad_to_multiple_of", "160"])
    train_pairs, _ = train.load_train_eval(config)
    trainer = train.build_trainer(config, str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)), train_pairs, None)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["packed_input_ids"].shape[1] % 160 == 0 and trainer.data_collator.row_multiple == 160


def test_the_padded_half_equals_trls_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rng = random.Random(0)

    def ids(longest):
        return [rng.randint(1, 99) for _ in range(rng.randint(1, longest))]

    # prompts shorter than every max_length: TRL drops the pairs whose prompt alone reaches it
    examples = [{"prompt_ids": ids(5), "chosen_ids": ids(9), "rejected_ids": ids(9)} for _ in range(5)]
    for max_length in (None, 12, 6):
        ours = packing.pack_batch(examples, max_length, pad_token_id=0)
        trl = DataCollatorForPreference(pad_token_id=0, max_length=max_length)(examples)
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(ours[key], trl[key]), (key, max_length)


def test_mask_by_hand():
    # one pair: prompt (2 tokens), chosen (2), rejected (1); then one token of a second pair
    pair = torch.tensor([0, 0, 0, 0, 0, 1])
    segment = torch.tensor([0, 0, 1, 1, 2, 0])
    mask = packing.dense_mask(pair, segment)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # chosen sees the prompt and itself
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # rejected sees the prompt, not the chosen answer
        [0, 0, 0, 0, 0, 1],  # the next pair sees nothing of the first
    ]


def test_varlen_sequences_by_hand():
    """The layout of test_layout_by_hand as FlashAttention's varlen sequences: per pair, prompt + chosen, then the
    rejected answer reading the prompt's keys again; then the padding."""
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]},
        {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8, 9, 10]},
    ]
    batch = packing.pack_batch(examples, max_length=4, pad_token_id=0, row_multiple=16, varlen=True)
    # row positions: 0-1 prompt_1, 2-3 chosen_1, 4 rejected_1, 5 prompt_2, 6 chosen_2, 7-9 rejected_2, 10-15 padding
    assert batch["packed_cu_seq_q"].tolist() == [0, 4, 5, 7, 10, 16]  # [0-3] [4] [5-6] [7-9] [10-15]
    assert batch["packed_kv_index"].tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 5, 7, 8, 9, *range(10, 16)]
    assert batch["packed_cu_seq_k"].tolist() == [0, 4, 7, 9, 13, 19]
    assert batch["packed_max_lengths"].shape == (6, 6, 0)  # the longest queries and keys: the padding's
    assert batch["packed_cu_seq_q"].dtype == batch["packed_cu_seq_k"].dtype == torch.int32
    assert not set(packing.VARLEN_KEYS) & set(packing.pack_batch(examples, 4, 0))  # only where asked for
    empty = packing.pack_batch([{"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": []}], None, 0, 1, True)
    assert empty["packed_cu_seq_q"].tolist() == [0, 4]  # an empty answer has no queries: no sequence
    assert empty["packed_kv_index"].tolist() == [0, 1, 2, 3]


def test_varlen_sequences_in_fixed_shapes_by_hand():
    """Under CUDA graphs (a recording for each new set of input shapes) the sequences' tensors are shaped by the row's
    length and the number of pairs alone: 2 x pairs + 1 sequences, empty ones last; 2 x length keys, those past the
    sequences' marked unread; the longest sequence bounded by max_length (or the row's padding)."""
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": []},
        {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8, 9, 10]},
    ]
    batch = packing.pack_batch(examples, 4, 0, row_multiple=16, varlen=True, fixed_shapes=True)
    # row positions: 0-1 prompt_1, 2-3 chosen_1, 4 prompt_2, 5 chosen_2, 6-8 rejected_2, 9-15 padding
    assert batch["packed_cu_seq_q"].tolist() == [0, 4, 6, 9, 16, 16]  # [0-3] [4-5] [6-8] [9-15], one empty
    assert batch["packed_cu_seq_k"].tolist() == [0, 4, 6, 10, 17, 17]
    assert batch["packed_kv_index"].tolist() == [0, 1, 2, 3, 4, 5, 4, 6, 7, 8, *range(9, 16), *[0] * 15]
    assert batch["packed_kv_used"].tolist() == [True] * 17 + [False] * 15
    assert batch["packed_max_lengths"].shape == (16, 16, 0)  # max(max_length 4, the padding's bound 16)
    other = packing.pack_batch([{"prompt_ids": [5] * 3, "chosen_ids": [6] * 5, "rejected_ids": [7] * 4}] * 2, 16, 0,
                               row_multiple=32, varlen=True, fixed_shapes=True)  # fmt: skip
    assert other["packed_max_lengths"].shape == (32, 32, 0)  # max_length 16 under the row_multiple 32
    shapes = [{key: tuple(b[key].shape) for key in packing.VARLEN_KEYS}
              for b in (batch, packing.pack_batch(examples[::-1], 4, 0, 16, True, True))]  # fmt: skip
    assert shapes[0] == shapes[1]  # other sequences, the same row length and pairs: the same shapes
    unbounded = packing.pack_batch(examples, None, 0, row_multiple=16, varlen=True, fixed_shapes=True)
    assert unbounded["packed_max_lengths"].shape == (16, 16, 0)  # without max_length: the row


@pytest.mark.parametrize("seed", range(2))
def test_varlen_attention_in_fixed_shapes_computes_the_same_and_drops_unread_keys_gradients(seed, monkeypatch):
    """The fixed-shape layout gives the outputs and gradients of the plain one; the keys no sequence reads get no
    gradient even where the kernel leaves their rows unwritten (FlashAttention's backward allocates them without
    zeroing: a stand-in fills them with NaN)."""
    rng = random.Random(seed)
    examples = [{key: [1] * rng.randint(lowest, 30) for key, lowest in
                 zip(("prompt_ids", "chosen_ids", "rejected_ids"), (1, 0, 0))} for _ in range(4)]  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    results = []
    for fixed in (False, True):
        batch = packing.pack_batch(examples, 40, 0, row_multiple=16, varlen=True, fixed_shapes=fixed)
        length = batch["packed_input_ids"].size(1)
        generator.manual_seed(seed)
        query = torch.randn(1, 4, length, 8, generator=generator, requires_grad=True)
        key, value = (torch.randn(1, 2, length, 8, generator=generator, requires_grad=True) for _ in "kv")
        out, _ = packing.varlen_attention(None, query, key, value, None, scaling=0.3,
                                          packed_varlen=packing.VarlenRow.from_batch(batch))  # fmt: skip
        results.append((out, *torch.autograd.grad(out.square().sum(), (query, key, value))))
    for plain, fixed in zip(*results, strict=True):
        assert torch.allclose(plain, fixed, atol=1e-6, rtol=0)
    backward = packing.sequences_attention_backward

    def unwritten_rows(grad, query, key, value, cu_seq_q, cu_seq_k, scale):
        dq, dk, dv = backward(grad, query, key, value, cu_seq_q, cu_seq_k, scale)
        read = int(cu_seq_k[-1])
        return dq, dk.index_fill(0, torch.arange(read, len(dk)), float("nan")), dv.index_fill(
            0, torch.arange(read, len(dv)), float("nan"))  # fmt: skip

    monkeypatch.setattr(packing, "sequences_attention_backward", unwritten_rows)
    out, _ = packing.varlen_attention(None, query, key, value, None, scaling=0.3,
                                      packed_varlen=packing.VarlenRow.from_batch(batch))  # fmt: skip
    gradients = torch.autograd.grad(out.square().sum(), (query, key, value))
    for expected, got in zip(results[0][1:], gradients, strict=True):
        assert torch.allclose(expected, got, atol=1e-6, rtol=0)
    batch["packed_kv_used"] = None  # without the mask, the stand-in's NaN reaches key 0's gradient
    out, _ = packing.varlen_attention(None, query, key, value, None, scaling=0.3,
                                      packed_varlen=packing.VarlenRow.from_batch(batch))  # fmt: skip
    assert torch.autograd.grad(out.square().sum(), key)[0].isnan().any()


def test_varlen_attention_says_which_torch_it_needs(monkeypatch):
    from dpolab.errors import DpolabError

    monkeypatch.setattr(packing, "varlen_attn", None)  # torch before 2.10 has no torch.nn.attention.varlen
    with pytest.raises(DpolabError, match=r"attn_implementation varlen_attn needs torch 2.10 or later"):
        packing.register_attention(packing.VARLEN_ATTENTION)


@pytest.mark.parametrize("seed", range(3))
def test_varlen_attention_computes_what_the_packed_rows_mask_allows(seed):
    """`varlen_attention` over `varlen_layout`'s sequences (the CPU's reference of FlashAttention's kernel) against
    SDPA with the dense mask of `allowed`, on random packings with grouped K/V (4 query heads per K/V head),
    truncated answers and answers truncated to nothing, outputs and gradients."""
    rng = random.Random(seed)
    examples = [{key: [1] * rng.randint(lowest, most) for key, lowest, most in
                 zip(("prompt_ids", "chosen_ids", "rejected_ids"), (1, 0, 0), (30, 40, 40))}
                for _ in range(5)]  # fmt: skip
    batch = packing.pack_batch(examples, max_length=rng.choice([None, 35]), pad_token_id=0, row_multiple=16,
                               varlen=True)  # fmt: skip
    length = batch["packed_input_ids"].size(1)
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 8, length, 16, generator=generator, requires_grad=True)
    key, value = (torch.randn(1, 2, length, 16, generator=generator, requires_grad=True) for _ in "kv")
    mask = packing.dense_mask(batch["packed_pair"][0], batch["packed_segment"][0])
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.25,
                                                                enable_gqa=True).transpose(1, 2)  # fmt: skip
    row = packing.VarlenRow.from_batch(batch)
    got, _ = packing.varlen_attention(None, query, key, value, None, scaling=0.25, packed_varlen=row)
    assert got.shape == expected.shape == (1, length, 8, 16)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()
    gradients = [torch.autograd.grad(out.square().sum(), (query, key, value)) for out in (got, expected)]
    for ours, theirs in zip(*gradients):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()  # sums of ~10


def test_flex_block_mask_follows_the_same_rule():
    batch = packing.pack_batch(
        [{"prompt_ids": list(range(1, 40)), "chosen_ids": list(range(50)), "rejected_ids": list(range(70))}] * 3,
        max_length=None, pad_token_id=0,
    )  # fmt: skip
    pair, segment = batch["packed_pair"][0], batch["packed_segment"][0]
    dense = packing.dense_mask(pair, segment)[0, 0]
    blocks = packing.block_mask(pair, segment)
    size = blocks.BLOCK_SIZE[0]
    # a block is skipped only when the rule masks every position in it
    for q_block in range((len(pair) + size - 1) // size):
        kept = set(blocks.kv_indices[0, 0, q_block, : blocks.kv_num_blocks[0, 0, q_block]].tolist())
        full = set(blocks.full_kv_indices[0, 0, q_block, : blocks.full_kv_num_blocks[0, 0, q_block]].tolist())
        for k_block in range((len(pair) + size - 1) // size):
            tile = dense[q_block * size : (q_block + 1) * size, k_block * size : (k_block + 1) * size]
            assert (k_block in kept or k_block in full) == bool(tile.any()), (q_block, k_block)
            if k_block in full:
                assert bool(tile.all())


@pytest.mark.parametrize("seed", range(4))
def test_allowed_per_block_counts_what_the_dense_mask_allows(seed):
    """The block counts the BlockMask is built from, without the T x T mask, against the dense rule's."""
    rng = random.Random(seed)
    examples = [{key: [1] * rng.randint(1, most) for key, most in zip(("prompt_ids", "chosen_ids", "rejected_ids"),
                                                                        (90, 150, 150))} for _ in range(6)]  # fmt: skip
    batch = packing.pack_batch(examples, max_length=rng.choice([None, 120]), pad_token_id=0,
                               row_multiple=rng.choice([1, 64, 512]))  # fmt: skip
    pair, segment = batch["packed_pair"][0], batch["packed_segment"][0]
    for block in (16, 128):
        blocks = -(-pair.numel() // block)
        dense = torch.nn.functional.pad(packing.dense_mask(pair, segment)[0, 0], (0, blocks * block - pair.numel()) * 2)
        expected = dense.view(blocks, block, blocks, block).sum((1, 3))
        assert torch.equal(packing.allowed_per_block(pair, segment, block), expected), block


@pytest.mark.parametrize("lengths", [(39, 50, 70), (3, 4, 5), (300, 500, 400)], ids=["mixed", "tiny", "long"])
def test_block_mask_is_the_one_create_block_mask_builds(lengths):
    from torch.nn.attention.flex_attention import create_block_mask

    rng = random.Random(sum(lengths))
    examples = [{key: [1] * rng.randint(1, most) for key, most in zip(("prompt_ids", "chosen_ids", "rejected_ids"),
                                                                        lengths)} for _ in range(5)]  # fmt: skip
    batch = packing.pack_batch(examples, max_length=None, pad_token_id=0)
    pair, segment = batch["packed_pair"][0], batch["packed_segment"][0]
    ours = packing.block_mask(pair, segment)
    theirs = create_block_mask(
        lambda b, h, q, k: packing.allowed(pair, segment, q, k), None, None, pair.numel(), pair.numel(), "cpu"
    )
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):  # fmt: skip
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def trainer_on(tmp_path, model_dir, fmt, max_length, attn="sdpa", count=10):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpolab.data import load_pairs

    rows = rows_in_format(fmt, count)
    for index, row in enumerate(rows):  # answers of different lengths, so pairs pack differently
        padding = " The sky is blue." * (index % 4)
        if fmt == "strings":
            row["chosen"] += padding
        elif fmt == "hh":
            row["chosen"] += padding
        else:
            row["chosen"][-1]["content"] += padding
    pairs = load_pairs(str(write_jsonl(tmp_path / f"{fmt}.jsonl", rows)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    args = DPOConfig(output_dir=str(tmp_path / "out"), bf16=False, max_length=max_length, report_to=[],
                     activation_checkpointing=False, precompute_ref_log_probs=False)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return DPOTrainer(model=model, args=args, train_dataset=pairs.dataset, processing_class=tokenizer), tokenizer


def per_token_logps(trainer, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
    with torch.no_grad():
        return trainer.model(**inputs, labels=labels, fused_lm_head=True).log_probs


@pytest.mark.parametrize(
    "fmt, max_length, attn",
    [("strings", 256, "sdpa"), ("messages", 256, "sdpa"), ("implicit", 256, "sdpa"), ("hh", 256, "sdpa"),
     ("messages", 30, "sdpa"), ("implicit", 28, "sdpa")],
    ids=["strings", "messages", "implicit", "hh", "truncated", "truncated-implicit"],
)  # fmt: skip
def test_packed_log_probs_equal_trls_padded_ones(tmp_path, tiny_model_dir, fmt, max_length, attn):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer, tokenizer = trainer_on(tmp_path, tiny_model_dir, fmt, max_length, attn)
    examples = [dict(example) for example in trainer.train_dataset]
    padded_collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    expected = per_token_logps(trainer, padded_collator(examples))
    packing.install(trainer.model)
    assert any(len(e["prompt_ids"]) + len(e["chosen_ids"]) > max_length for e in examples) == (
        max_length < 256
    )  # the truncated cases truncate
    for order in (list(range(len(examples))), list(reversed(range(len(examples))))):  # other neighbours
        batch = packing.pack_batch([examples[i] for i in order], max_length, tokenizer.pad_token_id)
        got = per_token_logps(trainer, batch)
        rows = order + [len(examples) + i for i in order]  # chosen rows, then rejected rows, in this order
        assert torch.allclose(got, expected[rows], atol=TOLERANCE, rtol=0), (got - expected[rows]).abs().max()
    assert expected.abs().sum() > 0


def test_packed_gradients_equal_trls(tmp_path, tiny_model_dir):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer, tokenizer = trainer_on(tmp_path, tiny_model_dir, "implicit", 40)
    examples = [dict(example) for example in trainer.train_dataset]
    gradients = []
    for packed in (False, True):
        if packed:
            packing.install(trainer.model)
            batch = packing.pack_batch(examples, 40, tokenizer.pad_token_id)
        else:
            batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=40)(examples)
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        gradients.append((loss.item(), [p.grad.clone() for p in trainer.model.parameters()]))
    (loss_padded, padded), (loss_packed, packed) = gradients
    assert loss_packed == pytest.approx(loss_padded, abs=TOLERANCE)
    assert max((a - b).abs().max().item() for a, b in zip(padded, packed)) < 1e-6


def test_flex_attention_scores_equal_trls_padded_ones(tmp_path, tiny_model_dir):
    """FlexAttention (what the GPU fast path uses) on the CPU: compiled by torch, so this test takes ~30 s."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer, tokenizer = trainer_on(tmp_path, tiny_model_dir, "messages", 48, attn="sdpa", count=6)
    examples = [dict(example) for example in trainer.train_dataset]
    expected = per_token_logps(trainer, DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id,
                                                                  max_length=48)(examples))  # fmt: skip
    trainer.model.config._attn_implementation = "flex_attention"
    packing.install(trainer.model)
    got = per_token_logps(trainer, packing.pack_batch(examples, 48, tokenizer.pad_token_id))
    assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("fmt, max_length", [("messages", 256), ("implicit", 28)], ids=["messages", "truncated"])
def test_varlen_attention_log_probs_and_gradients_equal_trls_padded_ones(tmp_path, tiny_model_dir, fmt, max_length):
    """`--attn_implementation varlen_attn` (FlashAttention's varlen kernel on a GPU; on the CPU its reference, one
    SDPA call per sequence): per-token log-probs, in two pair orders, and the DPO loss's gradients equal TRL's padded
    path's."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer, tokenizer = trainer_on(tmp_path, tiny_model_dir, fmt, max_length, attn="sdpa", count=8)
    examples = [dict(example) for example in trainer.train_dataset]
    padded = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)(examples)
    expected = per_token_logps(trainer, padded)
    trainer.model.train()
    trainer.compute_loss(trainer.model, padded).backward()
    expected_gradients = [parameter.grad.clone() for parameter in trainer.model.parameters()]
    trainer.model.zero_grad()
    packing.register_attention(packing.VARLEN_ATTENTION)
    trainer.model.config._attn_implementation = packing.VARLEN_ATTENTION
    packing.install(trainer.model)
    for order in (list(range(len(examples))), list(reversed(range(len(examples))))):  # other neighbours
        batch = packing.pack_batch([examples[i] for i in order], max_length, tokenizer.pad_token_id, varlen=True)
        got = per_token_logps(trainer, batch)
        rows = order + [len(examples) + i for i in order]
        assert torch.allclose(got, expected[rows], atol=TOLERANCE, rtol=0), (got - expected[rows]).abs().max()
    packed = packing.pack_batch(examples, max_length, tokenizer.pad_token_id, varlen=True)
    trainer.compute_loss(trainer.model, packed).backward()
    assert (
        max(
            (parameter.grad - expected_gradient).abs().max().item()
            for parameter, expected_gradient in zip(trainer.model.parameters(), expected_gradients)
        )
        < 1e-6
    )


def test_the_answer_head_computes_every_output_and_gradient_of_trls_head_without_host_waits(tmp_path, tiny_model_dir):
    """dpolab's LM head on the packed row's answer positions against TRL's fused head on the same packed batch (run
    as on CUDA: compacted with a boolean mask, `score_completion_tokens_only`), truncation included."""
    from dpolab.models import score_completion_tokens_only

    trainer, tokenizer = trainer_on(tmp_path, tiny_model_dir, "messages", 30)
    packing.install(trainer.model)
    batch = packing.pack_batch([dict(e) for e in trainer.train_dataset], 30, tokenizer.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
    trainer.model.train()
    results = []
    for head in ("TRL", "dpolab"):
        if head == "dpolab":
            assert packing.install_answer_head(trainer) is None
        trainer.model.zero_grad()
        waits = HostWaits()
        with waits.mode, score_completion_tokens_only():
            outputs = trainer.model(**inputs, labels=labels, fused_lm_head=True)
        (outputs.log_probs.sum() + 0.1 * outputs.entropy.sum() + outputs.loss).backward()
        results.append((outputs, [p.grad.clone() for p in trainer.model.parameters()], waits.count))
    (trl, trl_grads, trl_waits), (ours, grads, waits) = results
    for name in ("loss", "log_probs", "entropy", "mean_logits", "label_mask"):
        assert torch.allclose(getattr(ours, name).float(), getattr(trl, name).float(), atol=1e-6, rtol=0), name
    assert torch.equal(ours.is_top1, trl.is_top1) and ours.log_sum_sq_probs is trl.log_sum_sq_probs is None
    assert ours.log_probs.shape == labels[:, 1:].shape and trl.is_top1.any()
    assert max((a - b).abs().max().item() for a, b in zip(trl_grads, grads)) < 1e-6
    assert trl_waits == 2 and waits == 0  # TRL's hidden_states[mask] and labels[mask]
    # every other call is TRL's: a padded batch, and a model whose logits TRL's head transforms keeps TRL's head
    padded = per_token_logps(trainer, {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")})
    assert torch.allclose(padded, trl.log_probs, atol=TOLERANCE, rtol=0)
    other, _ = trainer_on(tmp_path, tiny_model_dir, "messages", 30)
    other.model.config.final_logit_softcapping = 30.0
    reason = packing.install_answer_head(other)
    assert reason == "the model's logits are transformed (final_logit_softcapping): TRL's LM head computes that"
    assert not hasattr(other.model, "_dpolab_answer_head")


class HostWaits:
    """Counts the operators that make the host wait for a CUDA device (a value or a size read on the host: `.item()`,
    `if t`, nonzero, boolean indexing), by bench/host_ops.py's rule (`sync_reason`), while `mode` is active."""

    def __init__(self):
        import sys
        from pathlib import Path

        from torch.utils._python_dispatch import TorchDispatchMode

        bench = str(Path(__file__).parents[1] / "bench")
        if bench not in sys.path:
            sys.path.insert(0, bench)
        from host_ops import sync_reason

        counter = self
        self.count = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += sync_reason(func, args) is not None
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("overrides", [{}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
                                       {"loss_type": ["ipo"], "ld_alpha": 0.5}],
                         ids=["sigmoid", "sigmoid+sft", "ipo-ld_alpha"])  # fmt: skip
def test_the_packed_step_computes_trls_loss_metrics_and_gradients_without_host_waits(
    tmp_path, tiny_model_dir, overrides
):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpolab.data import load_pairs
    from dpolab.models import score_completion_tokens_only

    pairs = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))))
    args = DPOConfig(output_dir=str(tmp_path / "o"), bf16=False, max_length=40, report_to=[], beta=0.5,
                     precompute_ref_log_probs=True, **overrides)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    packing.install(model)
    precision = {"dtype": "float32", "bf16": False, "fp16": False, "ld_alpha": args.ld_alpha}
    trainer = packing.reference_trainer_class()(
        model=model, args=args, train_dataset=pairs.dataset, processing_class=tokenizer,
        reference_path=str(tiny_model_dir), precision=precision,
    )  # fmt: skip
    packing.install_answer_head(trainer)
    examples = [dict(example) for example in trainer.train_dataset]
    for example in examples[::2]:  # the policy is the reference: move the references so the margins differ
        example["ref_chosen_logps"] -= 3.0
    batch = packing.pack_batch(examples, 40, tokenizer.pad_token_id)
    trl_batch = {key: value for key, value in batch.items() if key not in packing.ANSWER_KEYS}  # TRL's head
    trainer.model.train()
    results = []
    for compute_loss, inputs in ((DPOTrainer.compute_loss, trl_batch), (type(trainer).compute_loss, batch)):
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        waits = HostWaits()
        with waits.mode, score_completion_tokens_only():  # TRL's head compacts its positions, as on CUDA
            loss = compute_loss(trainer, trainer.model, inputs)
        loss.backward()
        trainer.log({})  # reads the metrics kept on the device
        logged = trainer.state.log_history.pop()
        results.append((loss.item(), [p.grad.clone() for p in trainer.model.parameters()], logged, waits.count))
    (trl_loss, trl_grads, trl_logged, trl_waits), (loss, grads, logged, waits) = results
    assert loss == pytest.approx(trl_loss, abs=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(trl_grads, grads)) < 1e-6
    assert set(logged) == set(trl_logged)
    assert {"rewards/margins", "logps/chosen", "logits/rejected", "entropy", "mean_token_accuracy"} < set(logged)
    for key, value in trl_logged.items():
        assert logged[key] == pytest.approx(value, abs=1e-6), key
    assert trl_logged["rewards/accuracies"] not in (0.0, 1.0)  # the metrics see a mixed batch
    assert trl_waits >= 17 and waits == 0


def test_the_packed_step_keeps_trls_loss_where_it_needs_what_it_does_not_compute(tmp_path, tiny_model_dir):
    """WPO weights (`use_weighting`) need TRL's per-token sums of squared probabilities: TRL's own loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from dpolab.data import load_pairs

    pairs = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 4))))
    args = DPOConfig(output_dir=str(tmp_path / "o"), bf16=False, max_length=40, report_to=[],
                     precompute_ref_log_probs=True, use_weighting=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    packing.install(model)
    precision = {"dtype": "float32", "bf16": False, "fp16": False, "ld_alpha": None}
    trainer = packing.reference_trainer_class()(
        model=model, args=args, train_dataset=pairs.dataset, reference_path=str(tiny_model_dir),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), precision=precision,
    )  # fmt: skip
    assert packing.install_answer_head(trainer) is None  # it computes WPO's log_sum_sq_probs for TRL's loss
    batch = packing.pack_batch([dict(e) for e in trainer.train_dataset], 40, trainer.processing_class.pad_token_id)
    waits = HostWaits()
    with waits.mode:
        loss = trainer.compute_loss(trainer.model, batch)
    assert waits.count >= 15  # TRL's metrics, read on the host as it computes them
    assert all(isinstance(values[0], float) for values in trainer._metrics["train"].values())
    without_answer_positions = {key: value for key, value in batch.items() if key not in packing.ANSWER_KEYS}
    trl_head_loss = trainer.compute_loss(trainer.model, without_answer_positions)
    assert loss.item() == pytest.approx(trl_head_loss.item(), abs=1e-6) and loss.item() != 0


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def evaluation_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["eval_loss"] for line in lines if '"eval_loss"' in line]


@pytest.mark.parametrize("overrides", [{"precompute_ref_log_probs": True},
                                       {"loss_type": ["sigmoid", "sft"], "precompute_ref_log_probs": False},
                                       {"use_peft": True, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"],
                                        "precompute_ref_log_probs": False}],
                         ids=["precomputed-reference", "sft-reference-each-step", "lora"])  # fmt: skip
def test_a_fast_run_logs_the_losses_of_trls_padded_run(tmp_path, tiny_config, overrides, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 24))
    config = str(tiny_config(data, max_steps=4, learning_rate=5e-3, train_sampling_strategy="sequential", **overrides))
    assert main(["train", "--config", config, "--run_name", "fast"]) == 0
    assert "Fast path: pairs packed" in capsys.readouterr().out
    assert main(["train", "--config", config, "--run_name", "padded", "--fast_path", "false"]) == 0
    fast, padded = losses(tmp_path / "runs" / "fast"), losses(tmp_path / "runs" / "padded")
    assert len(fast) == len(padded) == 4
    for a, b in zip(fast, padded, strict=True):  # four Adam steps at lr 5e-3: float noise stays below 1e-4
        for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
                    "mean_token_accuracy", "num_tokens"):  # fmt: skip
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)
    assert fast[-1]["rewards/margins"] != fast[0]["rewards/margins"]  # it learned


def test_a_varlen_run_logs_the_losses_of_trls_padded_run_and_needs_the_fast_path(
    tmp_path, tiny_config, capsys, backbone_settings_restored
):
    """`dpolab train --attn_implementation varlen_attn` (the reference in each step, its own model with SDPA, as TRL
    loads it) logs TRL's padded run's losses, under the CUDA-graph modes too (the whole backbone compiled, its rows of
    fixed shapes); without the fast path it is refused before anything is written."""
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 16))
    config = str(tiny_config(data, max_steps=3, learning_rate=5e-3, train_sampling_strategy="sequential",
                             precompute_ref_log_probs=False))  # fmt: skip
    assert main(["train", "--config", config, "--run_name", "varlen", "--attn_implementation", "varlen_attn"]) == 0
    assert "Fast path: pairs packed with their prompt shared (varlen_attn attention)" in capsys.readouterr().out
    assert main(["train", "--config", config, "--run_name", "padded", "--fast_path", "false"]) == 0
    varlen, padded = losses(tmp_path / "runs" / "varlen"), losses(tmp_path / "runs" / "padded")
    assert len(varlen) == len(padded) == 3
    for a, b in zip(varlen, padded, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "entropy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)
    refused = ["--run_name", "refused", "--attn_implementation", "varlen_attn", "--fast_path", "false"]
    assert main(["train", "--config", config, *refused]) == 2
    assert "attn_implementation varlen_attn computes only the fast path's packed rows, and the fast path is off " \
           "here (fast_path is false): use sdpa or flex_attention." in capsys.readouterr().err  # fmt: skip
    assert not (tmp_path / "runs" / "refused").exists()
    graphs = ["--run_name", "graphs", "--attn_implementation", "varlen_attn", "--torch_compile", "true",
              "--torch_compile_backend", "aot_eager", "--torch_compile_mode", "reduce-overhead"]  # fmt: skip
    torch._dynamo.reset()
    assert main(["train", "--config", config, *graphs]) == 0
    assert "the whole backbone compiled in place as one graph" in capsys.readouterr().out
    for a, b in zip(losses(tmp_path / "runs" / "graphs"), padded, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)


def test_the_fast_path_says_why_it_is_off(tmp_path, tiny_config, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 8))
    assert main(["train", "--config", str(tiny_config(data, max_steps=1, truncation_mode="keep_end"))]) == 0
    assert "Fast path off: truncation_mode keep_end" in capsys.readouterr().out
    eager = ["--config", str(tiny_config(data, max_steps=1)), "--attn_implementation", "eager", "--run_name", "eager"]
    assert main(["train", *eager]) == 0
    assert (
        "Fast path off: eager attention keeps each layer's whole scores, which on a packed row grow with the "
        "square of the pairs per micro-batch" in capsys.readouterr().out
    )


def test_the_reference_pre_pass_is_trls_and_is_cached(tmp_path, tiny_model_dir, capsys):
    """dpolab overrides one private TRL method: this fails when its signature or its values change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpolab.data import load_pairs

    assert list(inspect.signature(DPOTrainer._precompute_ref_logps).parameters) == [
        "self", "dataset", "name", "batch_size",
    ]  # fmt: skip
    pairs = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 10))))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def build(trainer_class, **extra):
        args = DPOConfig(output_dir=str(tmp_path / "o"), bf16=False, max_length=40, report_to=[],
                         precompute_ref_log_probs=True, per_device_train_batch_size=4)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return trainer_class(model=model, args=args, train_dataset=pairs.dataset, processing_class=tokenizer, **extra)

    trl = build(DPOTrainer)
    precision = {"dtype": "float32", "bf16": False, "fp16": False, "ld_alpha": None}
    ours = build(packing.reference_trainer_class(), reference_path=str(tiny_model_dir), precision=precision)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert ours.train_dataset[key] == pytest.approx(trl.train_dataset[key], abs=TOLERANCE)
    capsys.readouterr()
    build(packing.reference_trainer_class(), reference_path=str(tiny_model_dir), precision=precision)
    assert "Reference log-probs from cache" in capsys.readouterr().out


def test_the_packed_reference_pre_pass_is_trls_and_never_waits_for_the_device(tmp_path, tiny_model_dir, monkeypatch):
    """The fast path's pre-pass (packed batches, dpolab's LM head, results read once at the end) against TRL's own
    padded pre-pass; its waits counted with TRL's head compacting as on CUDA, against the same pass on TRL's head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpolab.data import load_pairs
    from dpolab.models import score_completion_tokens_only

    rows = rows_in_format("messages", 10)
    for index, row in enumerate(rows):  # answers of different lengths, some truncated at max_length 40
        row["chosen"][-1]["content"] += " The sky is blue." * (index % 4)
    pairs = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    precision = {"dtype": "float32", "bf16": False, "fp16": False, "ld_alpha": None}

    def build(trainer_class, **extra):
        args = DPOConfig(output_dir=str(tmp_path / "o"), bf16=False, max_length=40, report_to=[],
                         precompute_ref_log_probs=True, per_device_train_batch_size=4)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if trainer_class is DPOTrainer:
            return trainer_class(model=model, args=args, train_dataset=pairs.dataset, processing_class=tokenizer), 0
        packing.install(model)
        waits = HostWaits()
        with waits.mode, score_completion_tokens_only():
            trainer = trainer_class(model=model, args=args, train_dataset=pairs.dataset, processing_class=tokenizer,
                                    data_collator=packing.PackedCollator(tokenizer.pad_token_id, 40),
                                    reference_path=str(tiny_model_dir), precision=precision, **extra)  # fmt: skip
        return trainer, waits.count

    trl, _ = build(DPOTrainer)
    ours, waits = build(packing.reference_trainer_class())
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert ours.train_dataset[key] == pytest.approx(trl.train_dataset[key], **SUMS)
    assert getattr(ours.model, "_dpolab_answer_head", False)
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "another-cache"))  # computed again, not read
    monkeypatch.setattr(packing, "install_answer_head", lambda trainer: None)
    with_trls_head, trl_head_waits = build(packing.reference_trainer_class())
    assert with_trls_head.train_dataset["ref_chosen_logps"] == pytest.approx(trl.train_dataset["ref_chosen_logps"],
                                                                             **SUMS)  # fmt: skip
    # both: the DataLoader's iterator draws its seed from the host's generator twice (host memory: no device wait);
    # TRL's head adds its boolean compaction, twice in each of the 3 batches
    assert waits == 2 and trl_head_waits == 2 + 2 * 3


def test_the_reference_pre_pass_runs_only_when_the_run_sees_its_data(tmp_path, tiny_config, capsys):
    from dpolab.config import parse_train_args
    from dpolab.train import choose_reference_pass

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 24))
    short = parse_train_args(["--config", str(tiny_config(data, max_steps=2))])  # 8 of 24 pairs
    choose_reference_pass(short, 24)
    assert short.training.precompute_ref_log_probs is False
    assert "computed in each step (this run sees 8 of 24 pairs" in capsys.readouterr().out
    whole = parse_train_args(["--config", str(tiny_config(data, max_steps=6))])  # 24 of 24
    choose_reference_pass(whole, 24)
    assert whole.training.precompute_ref_log_probs is True
    asked = parse_train_args(["--config", str(tiny_config(data, max_steps=2)), "--precompute_ref_log_probs", "true"])
    choose_reference_pass(asked, 24)
    assert asked.training.precompute_ref_log_probs is True  # set explicitly: kept


def packed_inputs(seed: int, pairs: int = 4, varlen: bool = False, fixed_shapes: bool = False,
                  row_multiple: int = packing.ROW_MULTIPLE) -> dict:  # fmt: skip
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(3, 400) for _ in range(rng.randint(low, high))]

    examples = [{"prompt_ids": ids(5, 30), "chosen_ids": ids(3, 40), "rejected_ids": ids(3, 40)} for _ in range(pairs)]
    batch = packing.pack_batch(examples, 128, 0, row_multiple, varlen=varlen, fixed_shapes=fixed_shapes)
    keys = packing.PACKED_KEYS + (packing.VARLEN_KEYS if varlen else ())
    return {"input_ids": batch["input_ids"], **{key: batch[key] for key in keys if key in batch}}


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_sdpa_layers_share_one_mask_and_compute_what_the_boolean_mask_gives(tiny_model_dir, autocast):
    """SDPA turns a boolean mask into an additive one in every layer, and each layer keeps its copy for the backward
    (T x T each: 24 x 75 MiB at the bench's rows); the fast path hands every layer one additive mask, in the dtype SDPA
    computes in, kept once, and the hidden states and gradients are the boolean mask's exactly."""
    from transformers import AutoModelForCausalLM

    inputs = {key: value for key, value in packed_inputs(0).items() if key in packing.PACKED_KEYS[:4]}
    length = inputs["packed_input_ids"].shape[1]
    boolean_mask = packing.dense_mask(inputs["packed_pair"][0], inputs["packed_segment"][0])
    as_before = {"input_ids": inputs["packed_input_ids"], "position_ids": inputs["packed_position_ids"],
                 "attention_mask": boolean_mask}  # fmt: skip

    def forward_backward(model_inputs):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        packing.install(model)
        kept = set()

        def keep(tensor):
            if tensor.dim() >= 2 and tuple(tensor.shape[-2:]) == (length, length):
                kept.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                hidden = model.model(**model_inputs, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()
        return hidden, model.model.layers[0].self_attn.q_proj.weight.grad, len(kept)

    results = [forward_backward(inputs), forward_backward(as_before)]
    (hidden, gradient, masks_kept), (hidden_boolean, gradient_boolean, boolean_masks_kept) = results
    assert hidden.shape[1] == length and torch.equal(hidden, hidden_boolean)
    assert torch.equal(gradient, gradient_boolean)
    assert (masks_kept, boolean_masks_kept) == (1, 2)  # one for both layers; the boolean mask: one per layer


@pytest.mark.parametrize("attention", ["sdpa", "varlen_attn"])
def test_compiled_layers_compile_once_for_every_row_length(tiny_model_dir, attention):
    """Regional compilation with dynamic shapes: one graph for all layers, no new compile when rows change length
    (aot_eager: dynamo's tracing and guards without a C++ compiler, so the values are eager's exactly); with
    varlen_attn, whose sequences change in number and length too (on the CPU its reference is an operator that
    compiled code calls as it is)."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    packing.register_attention(packing.VARLEN_ATTENTION)
    eager, compiled = (AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
                       for _ in "ab")  # fmt: skip
    for model in (eager, compiled):
        packing.install(model)
    assert packing.compile_layers(compiled, "aot_eager", None) == len(compiled.model.layers) == 2
    assert packing.decoder_layers(compiled) is compiled.model.layers
    torch._dynamo.reset()
    graphs, lengths = [], set()
    for seed in range(4):
        inputs = packed_inputs(seed, pairs=2 + seed, varlen=attention == packing.VARLEN_ATTENTION)  # more sequences
        lengths.add(inputs["packed_input_ids"].shape[1])
        hidden = compiled.model(**inputs, use_cache=False).last_hidden_state
        hidden.sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
        expected = eager.model(**inputs, use_cache=False).last_hidden_state
        assert torch.allclose(hidden, expected, atol=1e-6, rtol=0)
    assert len(lengths) > 1  # the rows did change length
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs  # compiled in the first batch only
    assert all(p.grad is not None for p in compiled.model.layers[0].parameters())
    assert set(compiled.state_dict()) == set(eager.state_dict())  # in place: the weights keep their names


def test_compiled_flex_attention_layers_take_every_row_length_without_recompiling(tiny_model_dir):
    """The GPU fast path's case: a BlockMask (its lengths are Python ints) goes into each compiled layer. Forward
    only: FlexAttention has no backward on the CPU; the backward graph is derived from this same symbolic one."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    compiled = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flex_attention")
    packing.install(compiled)
    packing.compile_layers(compiled, "aot_eager", None)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # reset() keeps dynamo's counters
    graphs, lengths = [], set()
    with torch.no_grad():
        for seed in range(4):
            inputs = packed_inputs(seed)
            lengths.add(inputs["packed_input_ids"].shape[1])
            compiled.model(**inputs, use_cache=False)
            graphs.append(counters["stats"]["unique_graphs"] - before)
    assert len(lengths) > 1  # the rows did change length
    assert graphs == [1] * len(graphs), graphs  # one graph for every layer, compiled in the first batch only


@pytest.mark.parametrize("overrides", [{}, {"precompute_ref_log_probs": True, "activation_checkpointing": True},
                                       {"use_peft": True, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]}],
                         ids=["reference-each-step", "pre-pass-checkpointing", "lora"])  # fmt: skip
def test_torch_compile_on_the_fast_path_logs_the_eager_losses(tmp_path, tiny_config, overrides, capsys):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 24))
    config = str(tiny_config(data, max_steps=4, learning_rate=5e-3, train_sampling_strategy="sequential", **overrides))
    from torch._dynamo.utils import counters

    compile_flags = ["--torch_compile", "true", "--torch_compile_backend", "aot_eager"]
    torch._dynamo.reset()
    assert main(["train", "--config", config, "--run_name", "compiled", *compile_flags]) == 0
    assert "torch_compile: 2 decoder layers compiled in place (aot_eager, mode default" in capsys.readouterr().out
    compiled_frames = counters["frames"]["ok"]
    assert compiled_frames > 0  # dynamo did compile
    assert main(["train", "--config", config, "--run_name", "eager"]) == 0
    assert counters["frames"]["ok"] == compiled_frames  # and the eager run compiled nothing
    compiled, eager = losses(tmp_path / "runs" / "compiled"), losses(tmp_path / "runs" / "eager")
    assert len(compiled) == len(eager) == 4
    for a, b in zip(compiled, eager, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert compiled[-1]["rewards/margins"] != compiled[0]["rewards/margins"]  # it learned
    saved = (tmp_path / "runs" / "compiled" / "config.yaml").read_text()
    assert "torch_compile: true" in saved and "torch_compile_backend: aot_eager" in saved  # the user's settings
    weights = [
        {name: value for path in sorted((tmp_path / "runs" / run / "final").glob("*.safetensors"))
         for name, value in load_file(path).items()}
        for run in ("compiled", "eager")
    ]  # fmt: skip
    assert weights[0].keys() == weights[1].keys() and weights[0]  # the same names: nothing added by compiling
    for name, value in weights[1].items():
        assert torch.allclose(weights[0][name], value, atol=1e-5), name


def test_a_cuda_fast_path_compiles_its_layers_unless_told_or_unmeasured(tmp_path, tiny_config, monkeypatch, capsys):
    """train.choose_torch_compile on a pretend CUDA machine: on by default for the fast path's full fine-tuning;
    a given torch_compile, LoRA, another attention, a missing Triton and a GPU older than the A100 (compute
    capability 8.0) keep it off, saying why; the CPU: off. FlexAttention (train.attention_implementation) is the fast
    path's default on GPUs of 8.0 or more; older ones get SDPA (None: transformers' default) unless it is asked for."""
    import importlib.util

    from dpolab import train
    from dpolab.config import parse_train_args

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 8))
    config = str(tiny_config(data))

    def chosen(*flags, cuda=True, triton=True, capability=(9, 0)):
        settings = parse_train_args(["--config", config, *flags])
        real_find_spec = importlib.util.find_spec
        fake = lambda name, *a: (object() if triton else None) if name == "triton" else real_find_spec(name, *a)  # noqa: E731
        with monkeypatch.context() as patched:  # only around the choice: the fixtures' patches stay
            patched.setattr(torch.cuda, "is_available", lambda: cuda)
            patched.setattr(torch.cuda, "get_device_capability", lambda *device: capability)
            patched.setattr(importlib.util, "find_spec", fake)
            train.choose_torch_compile(settings)
            attention = train.attention_implementation(settings)
        compiled = settings.training.torch_compile  # compiled by inductor, as transformers sets for a given true
        assert settings.training.torch_compile_backend == ("inductor" if compiled else None)
        return compiled, capsys.readouterr().out, attention

    on = "torch_compile: on, the CUDA fast path's default (--torch_compile false turns it off).\n"
    assert chosen() == (True, on, "flex_attention")
    assert chosen(capability=(8, 0)) == (True, on, "flex_attention")  # an A100; 8.6, 8.9: RTX 3090, 4090
    assert chosen("--torch_compile", "false") == (False, "", "flex_attention")  # the user's word stands, silently
    assert chosen(cuda=False) == (False, "", None)  # CPU: compiling costs minutes for a few percent
    assert chosen("--use_peft", "true") == (
        False,
        "torch_compile: off (not measured with LoRA or quantized weights).\n",
        "flex_attention",
    )
    assert chosen("--attn_implementation", "sdpa") == (
        False,
        "torch_compile: off (measured with flex_attention, not sdpa).\n",
        "sdpa",
    )
    assert chosen("--fast_path", "false") == (False, "torch_compile: off (fast_path is off).\n", None)
    assert chosen(triton=False) == (False, "torch_compile: off (Triton is not installed).\n", "flex_attention")
    older = ("torch_compile: off (this GPU's compute capability 7.5 is below 8.0 (no bf16; FlexAttention and "
             "compiled layers were measured on 9.0 and are taken from 8.0 up)")  # fmt: skip
    assert chosen(capability=(7, 5)) == (False, older + ": the fast path takes SDPA with a dense mask).\n", None)  # T4
    flex = chosen("--attn_implementation", "flex_attention", capability=(7, 0))  # a V100, FlexAttention as asked
    assert flex == (False, older.replace("7.5", "7.0") + ").\n", "flex_attention")


def test_a_cuda_fast_path_scores_the_reference_32_pairs_a_batch(tmp_path, tiny_config, monkeypatch, capsys):
    """train.choose_reference_batch on a pretend CUDA machine: the fast path's reference pre-pass at 32 pairs a batch
    (2.1x the pairs/s of 8 on an H200), unless the batch is given; TRL's default (None: the micro-batch) with
    activation checkpointing, SDPA's dense mask, LoRA, no pre-pass, a micro-batch already as large, and on the CPU."""
    from dpolab import train
    from dpolab.config import parse_train_args

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 8))
    config = str(tiny_config(data, precompute_ref_log_probs=True))

    def chosen(*flags, cuda=True):
        settings = parse_train_args(["--config", config, *flags])
        with monkeypatch.context() as patched:
            patched.setattr(torch.cuda, "is_available", lambda: cuda)
            patched.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))
            train.choose_reference_batch(settings)
        return settings.training.precompute_ref_batch_size, capsys.readouterr().out

    said = "Reference pre-pass: 32 pairs per batch (2x the pairs/s of 8 on an H200; --precompute_ref_batch_size sets "
    said += "it).\n"
    assert chosen() == (32, said)
    assert chosen("--attn_implementation", "varlen_attn") == (32, said)
    assert chosen("--precompute_ref_batch_size", "4") == (4, "")
    assert chosen("--activation_checkpointing", "true") == (None, "")
    assert chosen("--attn_implementation", "sdpa") == (None, "")
    assert chosen("--use_peft", "true") == (None, "")
    assert chosen("--precompute_ref_log_probs", "false") == (None, "")
    assert chosen("--per_device_train_batch_size", "32") == (None, "")
    assert chosen(cuda=False) == (None, "")


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_the_compile_default_follows_the_fast_path_off(tmp_path, tiny_config, tiny_model_dir, monkeypatch, capsys,
                                                       mode):  # fmt: skip
    """A model the fast path cannot pack gets TRL's padded batches; the compile default, chosen for the fast path,
    goes with it (accelerate's whole-model compile was never measured) and the trainer is told torch_compile off;
    nothing is compiled, the CUDA-graph modes' whole backbone neither."""
    from dpolab import train
    from dpolab.config import parse_train_args
    from dpolab.models import load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 8))
    flags = ["--torch_compile_mode", mode] if mode else []
    config = parse_train_args(["--config", str(tiny_config(data, max_steps=1)), *flags])
    config.training.torch_compile = True  # as choose_torch_compile sets it on a GPU
    monkeypatch.setattr(packing, "unsupported_reason", lambda *args: "a model the fast path cannot pack")
    compiled = []
    monkeypatch.setattr(packing, "compile_backbone", lambda *args: compiled.append("backbone"))
    monkeypatch.setattr(packing, "compile_layers", lambda *args: compiled.append("layers"))
    train_pairs, _ = train.load_train_eval(config)
    trainer = train.build_trainer(config, str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)), train_pairs, None)
    out = capsys.readouterr().out
    assert "Fast path off: a model the fast path cannot pack." in out
    assert "torch_compile: off (the fast path's default, and the fast path is off)." in out
    assert trainer.args.torch_compile is False and trainer.data_collator.__class__.__module__.startswith("trl")
    assert compiled == []


@pytest.fixture
def backbone_settings_restored():
    """`packing.compile_backbone` sets two process-wide settings (dynamo's specialize_float, inductor's buffer
    reuse): a test that calls it gives them back afterwards, so later tests compile as they would alone."""
    import torch._inductor.config

    settings = ((torch._dynamo.config, "specialize_float"), (torch._inductor.config, "allow_buffer_reuse"))
    values = [getattr(config, name) for config, name in settings]
    yield
    for (config, name), value in zip(settings, values, strict=True):
        setattr(config, name, value)


def test_cuda_graph_modes_compile_the_whole_backbone_once_the_pre_pass_is_done(
    tmp_path, tiny_config, monkeypatch, capsys, request, backbone_settings_restored
):
    """reduce-overhead around each compiled layer left 24 backwards pending and ran 10x slower on an H100
    (bench/RESULTS.md): under the CUDA-graph modes the whole backbone is compiled as one graph, after the reference
    pre-pass (which runs eager), the reference kept by a run without pre-pass gets its layers compiled without
    graphs, and the run logs the eager run's losses (aot_eager: dynamo's graphs, eager's values), with gradient
    accumulation (gradients allocated first), activation checkpointing and evaluations between steps too, and saves
    its weights under their usual names."""
    import torch._inductor.config
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from dpolab.callbacks import GradientsAllocatedCallback

    events = []

    def spy(name, function):
        def called(*args, **kwargs):
            events.append((name, args[2] if name.startswith("compile") else None, counters["frames"]["ok"]))
            return function(*args, **kwargs)

        return called

    trainer_class = packing.reference_trainer_class()
    monkeypatch.setattr(trainer_class, "reference_pass", spy("pre-pass", trainer_class.reference_pass))
    monkeypatch.setattr(packing, "compile_backbone", spy("compile_backbone", packing.compile_backbone))
    monkeypatch.setattr(packing, "compile_layers", spy("compile_layers", packing.compile_layers))
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 24))
    graphs = ["--torch_compile", "true", "--torch_compile_backend", "aot_eager",
              "--torch_compile_mode", "reduce-overhead"]  # fmt: skip
    # the third: checkpointing (which fit_to_memory may choose) and an evaluation between steps, under no_grad
    # and rows rounded to 16 tokens (TRL's pad_to_multiple_of): up to 32 row lengths, past PyTorch's warning at 8
    checkpointing_eval = {"precompute_ref_log_probs": True, "activation_checkpointing": True, "eval_holdout": 0.25,
                          "eval_strategy": "steps", "eval_steps": 2, "pad_to_multiple_of": 16}  # fmt: skip
    triton = torch._inductor.config.triton
    # PyTorch's default, restored after by hand: monkeypatch's undo would delete the entry from torch's config (it
    # reads the old value from the proxy's own __dict__, where it is not), and every later compile would fail
    limit, triton.cudagraph_dynamic_shape_warn_limit = triton.cudagraph_dynamic_shape_warn_limit, 8
    request.addfinalizer(lambda: setattr(triton, "cudagraph_dynamic_shape_warn_limit", limit))
    mix_order, triton.mix_order_reduction = triton.mix_order_reduction, True  # a size guard: one graph per size
    request.addfinalizer(lambda: setattr(triton, "mix_order_reduction", mix_order))
    # the second: 2 micro-batches of 2 pairs per step, whose gradients are allocated before the step's backwards
    accumulating = {"precompute_ref_log_probs": False, "per_device_train_batch_size": 2,
                    "gradient_accumulation_steps": 2}  # fmt: skip
    monkeypatch.setattr(GradientsAllocatedCallback, "on_step_begin",
                        spy("gradients allocated", GradientsAllocatedCallback.on_step_begin))  # fmt: skip
    for run, overrides in (("precomputed", {"precompute_ref_log_probs": True}),
                           ("reference-each-step", accumulating),
                           ("checkpointing-eval", checkpointing_eval)):  # fmt: skip
        config = str(tiny_config(data, max_steps=4, learning_rate=5e-3, train_sampling_strategy="sequential",
                                 **overrides))  # fmt: skip
        torch._dynamo.reset()
        events.clear()
        before = counters["frames"]["ok"]  # torch 2.11's reset leaves the counters, 2.13's clears them
        assert main(["train", "--config", config, "--run_name", run, *graphs]) == 0
        out = capsys.readouterr().out
        assert "torch_compile: mode reduce-overhead: the whole backbone compiled in place as one graph" in out
        assert triton.mix_order_reduction is False
        if run == "checkpointing-eval":  # 4 pairs of at most 2 x 64 tokens, rounded to 16: 32 lengths
            assert "rows rounded to 16 tokens: at most 32 lengths" in out
            assert triton.cudagraph_dynamic_shape_warn_limit == 32
        else:  # 512 tokens hold every row: 1 length, under PyTorch's 8
            assert "rows rounded to 512 tokens: at most 1 length)" in out
            assert triton.cudagraph_dynamic_shape_warn_limit == 8
        assert counters["frames"]["ok"] > before  # dynamo compiled
        names = [name for name, _, _ in events if name != "gradients allocated"]
        steps_begun = [name for name, _, _ in events if name == "gradients allocated"]
        assert len(steps_begun) == (4 if run == "reference-each-step" else 0)  # with accumulation only: each step
        assert ("gradients allocated before each step's backward passes" in out) == (run == "reference-each-step")
        if run != "reference-each-step":  # one pre-pass per split
            assert names == ["pre-pass"] * (1 + (run == "checkpointing-eval")) + ["compile_backbone"], events
            assert events[-1][1:] == ("reduce-overhead", before)  # the pre-pass compiled nothing
        else:
            assert names == ["compile_layers", "compile_backbone"], events  # the reference's, then the policy's
            assert events[0][1] is None  # the reference's layers: default mode, no CUDA graphs per layer
        assert main(["train", "--config", config, "--run_name", f"{run}-eager"]) == 0
        capsys.readouterr()
        compiled, eager = losses(tmp_path / "runs" / run), losses(tmp_path / "runs" / f"{run}-eager")
        assert len(compiled) == len(eager) == 4
        for a, b in zip(compiled, eager, strict=True):
            for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
                # float32 rounding of dynamo's decomposed ops: ~1 ulp of a log-prob sum of -81 is 1e-5
                assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-6), (run, a["step"], key)
        assert compiled[-1]["rewards/margins"] != compiled[0]["rewards/margins"]  # it learned
        if run == "checkpointing-eval":
            evaluations = [evaluation_losses(tmp_path / "runs" / name) for name in (run, f"{run}-eager")]
            assert len(evaluations[0]) == len(evaluations[1]) >= 2  # steps 2 and 4
            assert evaluations[0] == pytest.approx(evaluations[1], abs=1e-5)
        weights = [set(load_file(path)) for name in (run, f"{run}-eager")
                   for path in (tmp_path / "runs" / name / "final").glob("*.safetensors")]  # fmt: skip
        assert weights[0] == weights[1] and weights[0]  # the same names: nothing added by compiling


@pytest.mark.parametrize("attn", ["sdpa", "varlen_attn"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_the_whole_backbone_traces_one_decoder_layer_and_stamps_it_out(tiny_model_dir, backend, attn,
                                                                       backbone_settings_restored):  # fmt: skip
    """Traced layer by layer, the CUDA-graph modes' first step took 190 s on an H200 machine (bench/RESULTS.md):
    `compile_backbone` runs every decoder layer through one nested compile region, so dynamo's graph calls one
    traced layer once per layer; one graph for every row length; hidden states and every gradient are eager's, with
    inductor too (C++ kernels here; with the region and inductor's buffer reuse, most gradients were wrong). With
    varlen_attn, in rows of fixed shapes as under CUDA graphs (its CPU reference an operator, as the kernel is)."""
    import torch._inductor.config
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    graphs = []

    def compiler(graph, example_inputs):  # dynamo's graph kept, then compiled by the backend
        graphs.append(graph)
        return lookup_backend(backend)(graph, example_inputs)

    varlen = attn == packing.VARLEN_ATTENTION
    packing.register_attention(attn)
    eager, compiled = (AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
                       for _ in "ab")  # fmt: skip
    for model in (eager, compiled):
        packing.install(model)
    torch._dynamo.reset()
    breaks = counters["graph_break"].total()  # earlier tests' breaks are kept (torch 2.11's reset keeps counters)
    packing.compile_backbone(compiled, compiler, None)
    assert torch._dynamo.config.specialize_float is True and torch._inductor.config.allow_buffer_reuse is False
    lengths = set()
    for seed in range(2):
        # past one 128-token block: no guard on a single block
        inputs = packed_inputs(seed, pairs=5 + seed, varlen=varlen, fixed_shapes=varlen, row_multiple=16)
        del inputs["packed_gather_index"]  # the packed row's hidden states, as dpolab's LM head asks for them
        lengths.add(inputs["packed_input_ids"].shape[1])
        hidden = {}
        for model in (compiled, eager):
            model.zero_grad()
            hidden[model] = model.model(**inputs, use_cache=False).last_hidden_state
            hidden[model].square().mean().backward()
        assert torch.allclose(hidden[compiled], hidden[eager], atol=1e-5, rtol=0)
        gradients = dict(eager.model.named_parameters())
        for name, parameter in compiled.model.named_parameters():
            expected = gradients[name].grad
            # inductor reorders float32 sums: up to 1.2e-4 of a tensor's largest gradient on an AVX-512 CPU (k_proj's
            # bias, whose gradient is a near-cancelling sum); the buffer-reuse bug was off by 1.75x to 1e4x
            assert torch.allclose(parameter.grad, expected, atol=1e-3 * expected.abs().max(), rtol=0), name
    assert len(lengths) > 1 and len(graphs) == 1, (lengths, len(graphs))  # compiled once, for every row length
    assert counters["graph_break"].total() == breaks
    calls = [node for node in graphs[0].graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == len(compiled.model.layers) == 2  # every layer a call of the region
    assert len({node.args[0].target for node in calls}) == 1  # one traced layer for all of them
    assert set(compiled.state_dict()) == set(eager.state_dict())  # in place: the weights keep their names


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa", "varlen_attn"])
def test_the_packed_backbone_touches_no_host_tensor_so_cuda_graphs_are_kept(tiny_model_dir, monkeypatch, attn):
    """Under the CUDA-graph modes the whole packed backbone is one compiled graph, its mask built inside it; inductor
    runs a graph holding any op on a CPU tensor without CUDA graphs ("skipping cudagraphs due to cpu device", one
    warning among the run's output: the run is only slower). Here the forward and backward run on the meta device,
    standing in for the GPU (inductor counts meta as no device at all), and no op may read or make a CPU tensor.
    FlexAttention refuses meta tensors: a stand-in of transformers' call to it keeps the shapes and checks that the
    BlockMask it is given is on the model's device. varlen_attn runs torch's FlashAttention operator there (its
    shapes-only implementation), in bf16 and rows of fixed shapes, as under CUDA graphs."""
    from types import SimpleNamespace

    import transformers.integrations.flex_attention as transformers_flex
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from transformers import AutoModelForCausalLM

    masks = []

    def flex_attention_stand_in(query, key, value, block_mask=None, **kwargs):
        masks.append({name: t.device.type for name, t in vars(block_mask).items() if isinstance(t, torch.Tensor)})
        return query * 1.0, SimpleNamespace(lse=query.float().sum(-1))

    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention", flex_attention_stand_in)
    ops, on_the_host = [], []

    class Devices(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ops.append(func)
            if any(t.device.type == "cpu" for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)):
                on_the_host.append(func)
            return out

    varlen = attn == packing.VARLEN_ATTENTION
    packing.register_attention(attn)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn,
                                                 dtype=torch.bfloat16 if varlen else torch.float32)  # fmt: skip
    packing.install(model)
    model.to("meta")
    inputs = {key: value.to("meta") for key, value in packed_inputs(0, varlen=varlen, fixed_shapes=varlen).items()}
    with Devices():
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        forward_ops = len(ops)
        hidden.float().square().mean().backward()
    assert hidden.device.type == "meta" and model.model.layers[0].mlp.up_proj.weight.grad is not None
    assert forward_ops > 100 and len(ops) - forward_ops > 100  # the mask, both layers and the gather; their backward
    assert on_the_host == []
    if attn == "flex_attention":
        assert len(masks) == 2 and set(masks[0].values()) == {"meta"} and len(masks[0]) == 8, masks
    if varlen:  # the kernel's operator, forward and backward, in each layer
        assert ops.count(torch.ops.torch_attn._varlen_attn.default) == 2
        assert ops.count(torch.ops.torch_attn._varlen_attn_backward.default) == 2


def test_gradients_allocated_before_the_backward_passes_are_added_into_in_place(tiny_model_dir):
    """Under CUDA graphs a `.grad` that autograd took over from a backward graph's output lives in the graphs' pool,
    which the next micro-batch's replay reclaims (pytorch/pytorch#169545). With the gradients allocated at the start
    of the step, both backward passes add into each parameter's own tensor (its storage never changes) and the
    accumulated gradients are those of two backward passes from unset gradients, bit for bit."""
    from transformers import AutoModelForCausalLM

    from dpolab.callbacks import GradientsAllocatedCallback

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    micro_batches = [torch.randint(0, model.config.vocab_size, (2, 12)) for _ in range(2)]

    def backward(ids):
        model(input_ids=ids, labels=ids).loss.backward()

    for ids in micro_batches:
        backward(ids)
    expected = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()  # set to None, as the Trainer does after each optimizer step
    GradientsAllocatedCallback().on_step_begin(None, None, None, model=model)
    storage = [parameter.grad.data_ptr() for parameter in model.parameters()]
    assert all(parameter.grad is not None and not parameter.grad.any() for parameter in model.parameters())
    for ids in micro_batches:
        backward(ids)
        assert [parameter.grad.data_ptr() for parameter in model.parameters()] == storage  # added in place
    for parameter, gradient in zip(model.parameters(), expected, strict=True):
        assert torch.equal(parameter.grad, gradient)


@pytest.mark.parametrize("stage", ["pre-pass", "training"])
def test_a_failed_compile_is_one_message_saying_how_to_train_without_it(tmp_path, tiny_config, monkeypatch, capsys,
                                                                          stage):  # fmt: skip
    """Inductor, Triton or the C compiler failing (here: pretended) ends the run with the cause, where it was raised,
    the backend, and the flag that trains without compiling; a failure in the reference pre-pass leaves no run
    directory behind."""
    from torch._dynamo.exc import BackendCompilerFailed
    from trl import DPOTrainer

    from dpolab import train

    def fail(*args, **kwargs):
        try:
            raise RuntimeError("failed to find a C compiler\nits second line")
        except RuntimeError as cause:
            raise BackendCompilerFailed(lambda *a: None, cause, None) from None

    if stage == "pre-pass":
        monkeypatch.setattr(train, "build_trainer", fail)
    else:
        monkeypatch.setattr(DPOTrainer, "train", fail)
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 8))
    config = str(tiny_config(data, precompute_ref_log_probs=True))
    assert main(["train", "--config", config, "--torch_compile", "true", "--torch_compile_backend", "aot_eager"]) == 2
    message = capsys.readouterr().err
    cause = r"RuntimeError: failed to find a C compiler \(raised in \S*tests/test_packing.py:\d+, fail\)\n"
    assert re.search(rf"torch_compile \(as set, backend aot_eager\) could not compile the model: {cause}", message)
    assert "its second line" not in message and "Traceback" not in message
    if stage == "pre-pass":
        assert "Train without it: the same command plus --torch_compile false." in message
        assert not (tmp_path / "runs" / "tiny").exists()  # a run that never started leaves nothing
    else:
        assert "no checkpoint was saved yet: start again with another --run_name and --torch_compile false" in message


@pytest.mark.parametrize("stage", ["pre-pass", "training"])
@pytest.mark.parametrize("wrapped", [True, False])
def test_flex_attention_kernels_that_do_not_fit_the_gpu_name_sdpa(tmp_path, tiny_config, monkeypatch, capsys, stage,
                                                                   wrapped):  # fmt: skip
    """FlexAttention's backward kernel needs more shared memory per block than 24 GB cards such as the RTX 4090
    have (pytorch/pytorch#133254); transformers compiles it even with torch_compile off, so that flag cannot help:
    the message names SDPA. The failure comes wrapped by inductor when it compiles, or as a RuntimeError when the
    kernel is first launched (here: pretended, in the attention of the pre-pass or the first training step)."""
    import transformers.integrations.flex_attention as flex
    from torch._inductor.exc import InductorError

    no_fit = RuntimeError("No valid triton configs. OutOfResources: out of resource: shared memory, Required: "
                          "131074, Hardware limit: 101376. Reducing block sizes or `num_stages` may help.")  # fmt: skip

    def kernel_that_does_not_fit(*args, **kwargs):
        raise InductorError(no_fit, None) if wrapped else no_fit

    monkeypatch.setattr(flex, "compile_friendly_flex_attention", kernel_that_does_not_fit)
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("implicit", 8))
    config = str(tiny_config(data, precompute_ref_log_probs=stage == "pre-pass", attn_implementation="flex_attention"))
    assert main(["train", "--config", config, "--torch_compile", "false"]) == 2
    message = capsys.readouterr().err
    assert "FlexAttention (the fast path's attention on a GPU) could not be compiled for this GPU: RuntimeError: No " \
           "valid triton configs. OutOfResources: out of resource: shared memory" in message  # fmt: skip
    assert "torch_compile" not in message and "Traceback" not in message  # it was off: not the flag to name
    if stage == "pre-pass":
        assert message.rstrip().endswith("the same command plus --attn_implementation sdpa.")
        assert not (tmp_path / "runs" / "tiny").exists()  # a run that never started leaves nothing
    else:
        assert "no checkpoint was saved yet: start again with another --run_name and --attn_implementation sdpa" in \
               message  # fmt: skip
