"""The fast path: each pair laid out once, its prompt shared by both answers, a whole batch packed in one row.

TRL's DPOTrainer pads chosen and rejected to the longest sequence of the batch and computes every prompt twice.
Here a batch of B pairs becomes one row `prompt_1 chosen_1 rejected_1 prompt_2 ...` with position ids that
restart at each answer (both answers continue from the prompt's last position) and an attention mask in which
each answer sees its own prompt and itself, never the other answer or another pair ("Accelerating Direct
Preference Optimization with Prefix Sharing", Wang et al. 2024). The backbone runs on that row; its hidden
states are then gathered back into TRL's padded [chosen..., rejected...] layout, so TRL's own fused LM head,
losses and metrics run unchanged on top (`install`). In training, TRL's head kernel runs on the answer positions
the collator lists instead (`install_answer_head`), its results laid out as TRL's head lays them out.

The batch keeps TRL's padded `input_ids`, `attention_mask` and `completion_mask` (cheap integer tensors TRL
reads for labels, token counts and metrics) beside the packed tensors, which TRL passes on to the model
untouched. Reference log-probs come from a pre-pass (`PrecomputedReferenceDPOTrainer`) kept in dpolab's
on-disk cache, the same cache `dpolab eval` and `sweep` read; with them, that trainer computes TRL's loss and
metrics without reading device values back in every step (`loss_without_waits`).

Masks: FlexAttention (a BlockMask: fully masked 128x128 blocks are skipped) or SDPA (one dense additive mask for
every layer); or no mask at all with `varlen_attn`, PyTorch's FlashAttention over variable-length sequences, each pair
computed as two (`varlen_layout`). Other attention implementations keep TRL's padded path (eager attention too: its
scores on a packed row grow with the square of the batch). With TRL's `torch_compile`, the decoder layers are
compiled in place (`compile_layers`).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import NamedTuple

import numpy
import torch

from dpolab.errors import DpolabError, out_of_memory_error

try:  # torch 2.10 and later; imported here, not inside `varlen_attention`, which compiled layers trace
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_pair", "packed_segment", "packed_gather_index")
ANSWER_KEYS = ("packed_answer_index", "packed_answer_labels", "packed_answer_slot")  # read by `answer_head_forward`
PROMPT, CHOSEN, REJECTED = 0, 1, 2
PAD_PAIR = -1  # the pair id of the tokens that round the row's length up
ROW_MULTIPLE = 64  # the packed row's length is rounded up to this: fewer distinct shapes, aligned matmuls
# torch.compile modes that record CUDA graphs, one per row length: rows rounded to this, fewer lengths to record
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
CUDA_GRAPH_ROW_MULTIPLE = 512
# PyTorch's FlashAttention over variable-length sequences (torch.nn.attention.varlen), registered with transformers
# under this name (`register_attention`)
VARLEN_ATTENTION = "varlen_attn"
SUPPORTED_ATTENTION = ("sdpa", "flex_attention", VARLEN_ATTENTION)
# `varlen_layout`'s tensors; packed_kv_used only in rows of fixed shapes (the CUDA-graph modes)
VARLEN_KEYS = ("packed_kv_index", "packed_cu_seq_q", "packed_cu_seq_k", "packed_max_lengths", "packed_kv_used")


# --- layout (pure) ------------------------------------------------------------------------------------------------


def truncated_answers(example: dict, max_length: int | None) -> tuple[list[int], list[int]]:
    """Chosen and rejected ids as TRL's collator keeps them with keep_start truncation of prompt + answer."""
    if max_length is None:
        return example["chosen_ids"], example["rejected_ids"]
    room = max(max_length - len(example["prompt_ids"]), 0)
    return example["chosen_ids"][:room], example["rejected_ids"][:room]


def records_cuda_graphs(torch_compile: bool, torch_compile_mode: str | None) -> bool:
    """Whether a fast-path run with these settings compiles its whole backbone into CUDA graphs."""
    return bool(torch_compile) and torch_compile_mode in CUDA_GRAPH_MODES


def row_multiple(torch_compile: bool, torch_compile_mode: str | None, pad_to_multiple_of: int | None = None) -> int:
    """What a packed row's length is rounded up to: TRL's `pad_to_multiple_of` where set (on the fast path the
    packed row is the sequence the model computes), else 512 under compile modes with CUDA graphs, else 64."""
    if pad_to_multiple_of:
        return pad_to_multiple_of
    return CUDA_GRAPH_ROW_MULTIPLE if records_cuda_graphs(torch_compile, torch_compile_mode) else ROW_MULTIPLE


def row_lengths_at_most(pairs_per_row: int, max_length: int | None, multiple: int) -> int | None:
    """How many row lengths a run can meet (None without max_length): a row holds up to `pairs_per_row` pairs,
    each under 2 x max_length tokens (prompt + answer within max_length for both answers, the prompt once),
    rounded up to `multiple`."""
    if max_length is None:
        return None
    return -(-pairs_per_row * 2 * max_length // multiple)


def pack_batch(
    examples: list[dict],
    max_length: int | None,
    pad_token_id: int,
    row_multiple: int = ROW_MULTIPLE,
    varlen: bool = False,
    fixed_shapes: bool = False,
) -> dict[str, torch.Tensor]:
    """TRL's padded tensors for a batch plus the packed row the fast path computes on.

    Returns input_ids, attention_mask, completion_mask: [2B, L] exactly as TRL's `DataCollatorForPreference`
    (chosen rows first) and packed_input_ids, packed_position_ids, packed_pair, packed_segment: [1, T],
    packed_gather_index: [2B, L], the packed position holding each padded position's token (T, a zero row,
    for padding), and for each answer token TRL's LM head scores (N in all): packed_answer_index, the packed
    position whose hidden state predicts it, packed_answer_labels, its id, and packed_answer_slot, where TRL's
    head puts its log-prob in the flattened [2B, L - 1] layout. `ref_chosen_logps`/`ref_rejected_logps` pass
    through when the examples carry them. With `varlen`, also `varlen_layout`'s tensors (VARLEN_KEYS), with
    `fixed_shapes` (the CUDA-graph modes) in shapes set by the row's length and the number of pairs alone.
    """
    tokens, positions, pairs, segments = [], [], [], []
    spans = [[], []]  # [chosen rows, rejected rows]: (prompt start, prompt length, answer start, answer length)
    for pair_id, example in enumerate(examples):
        prompt = example["prompt_ids"]
        if max_length is not None and len(prompt) >= max_length:
            raise ValueError("a prompt reaches max_length: TRL drops such pairs before they are collated")
        start = len(tokens)
        tokens += prompt
        positions += range(len(prompt))
        pairs += [pair_id] * len(prompt)
        segments += [PROMPT] * len(prompt)
        for side, (segment, answer) in enumerate(zip((CHOSEN, REJECTED), truncated_answers(example, max_length))):
            spans[side].append((start, len(prompt), len(tokens), len(answer)))
            tokens += answer
            positions += range(len(prompt), len(prompt) + len(answer))  # each answer continues the prompt
            pairs += [pair_id] * len(answer)
            segments += [segment] * len(answer)
    length = -(-len(tokens) // row_multiple) * row_multiple

    def packed(values: list[int], fill: int) -> torch.Tensor:  # [1, length]; numpy converts lists ~4x faster
        return torch.from_numpy(numpy.array(values + [fill] * (length - len(values)), dtype=numpy.int64))[None]

    rows = spans[0] + spans[1]
    gather = torch.full((len(rows), max(p + a for _, p, _, a in rows)), length, dtype=torch.long)
    for row, (prompt_start, prompt_length, answer_start, answer_length) in enumerate(rows):
        gather[row, :prompt_length] = torch.arange(prompt_start, prompt_start + prompt_length)
        gather[row, prompt_length : prompt_length + answer_length] = torch.arange(
            answer_start, answer_start + answer_length
        )
    packed_input_ids, packed_segment = packed(tokens, pad_token_id), packed(segments, PROMPT)

    def in_rows(row: torch.Tensor, fill: int) -> torch.Tensor:  # the packed row read into TRL's padded layout
        return torch.cat([row[0], row.new_tensor([fill])])[gather]

    real = gather < length  # padding positions read index `length`, past the row
    input_ids = in_rows(packed_input_ids, pad_token_id)
    completion_mask = (real & (in_rows(packed_segment, PROMPT) != PROMPT)).long()
    # TRL's head scores position c of a padded row when the token at c + 1 is an answer token (labels[:, 1:]
    # != -100) with the hidden state at c: found here on the host, not with a boolean mask on the device
    answer_slot = torch.from_numpy(numpy.flatnonzero(completion_mask[:, 1:].numpy()))
    batch = {
        "input_ids": input_ids,
        "attention_mask": real.long(),
        "completion_mask": completion_mask,
        "packed_input_ids": packed_input_ids,
        "packed_position_ids": packed(positions, 0),
        "packed_pair": packed(pairs, PAD_PAIR),
        "packed_segment": packed_segment,
        "packed_gather_index": gather,
        "packed_answer_index": gather[:, :-1].flatten()[answer_slot],
        "packed_answer_labels": input_ids[:, 1:].flatten()[answer_slot],
        "packed_answer_slot": answer_slot,
    }
    if varlen:
        # under fixed shapes both ints are bounds: a sequence is a prompt and an answer (within max_length) or the
        # row's padding (under row_multiple); without max_length, the row
        longest = (max(max_length, row_multiple) if max_length else length) if fixed_shapes else None
        batch.update(varlen_layout(spans[0], spans[1], len(tokens), length, longest))
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([example[key] for example in examples])
    return batch


def varlen_layout(
    chosen_spans, rejected_spans, used: int, length: int, longest: int | None = None
) -> dict[str, torch.Tensor]:
    """A packed row as the sequences FlashAttention's varlen kernel computes (`varlen_attention`): for each pair,
    prompt + chosen attending to themselves, then the rejected answer attending to the prompt and itself; then the
    row's padding, to itself. Each sequence's queries are its own positions of the row, in order; its keys are
    gathered (`packed_kv_index`), so a prompt's keys and values are read by both of its sequences. The kernel's causal
    mask is aligned to the bottom right (a query sees every key up to its own position counted from the end), so a
    rejected answer's first token sees the whole prompt and itself: what `allowed` lets it see.

    chosen_spans, rejected_spans: (prompt start, prompt length, answer start, answer length) per pair, from
    `pack_batch`; used: the row's tokens before its padding; length: the padded row's. Returns packed_kv_index [Tk]
    (int64), packed_cu_seq_q and packed_cu_seq_k [S + 1] (int32, cumulative lengths), and packed_max_lengths, an
    empty tensor of shape [longest queries, longest keys, 0]: the kernel takes both as ints, read off a shape without
    waiting for the device.

    With `longest` (the CUDA-graph modes, which record a graph for each new set of input shapes): shapes set by the
    row's length and the number of pairs alone, so a graph is recorded once per row length, not for nearly every
    batch. 2 x pairs + 1 sequences (empty ones at the end: no queries, no keys, nothing computed); 2 x length keys
    (the prompts read twice are fewer than the row's tokens), those past the last sequence read by none and marked
    in packed_kv_used [Tk] (bool: `varlen_attention` gives them no gradient); `longest` as both ints, a bound on
    every sequence (the kernel's grid is sized by it; a shorter sequence's blocks past its end do nothing)."""
    queries, keys = [], []  # lengths, and the row positions each sequence's keys are read from
    for (start, prompt, chosen_start, chosen), (_, _, rejected_start, rejected) in zip(chosen_spans, rejected_spans):
        queries.append(prompt + chosen)
        keys.append(numpy.arange(start, chosen_start + chosen))
        if rejected:  # an empty answer has no queries: no sequence
            queries.append(rejected)
            keys.append(numpy.concatenate([numpy.arange(start, start + prompt),
                                           numpy.arange(rejected_start, rejected_start + rejected)]))  # fmt: skip
    if length > used:
        queries.append(length - used)
        keys.append(numpy.arange(used, length))
    kept = [i for i, count in enumerate(queries) if count]
    queries, keys = [queries[i] for i in kept], [keys[i] for i in kept]

    def cumulative(counts: list[int]) -> torch.Tensor:
        return torch.from_numpy(numpy.concatenate([[0], numpy.cumsum(counts)]).astype(numpy.int32))

    key_lengths = [len(k) for k in keys]
    kv_index = numpy.concatenate(keys)
    bounds, fixed = (max(queries), max(key_lengths)), {}
    if longest is not None:  # fixed shapes: empty sequences at the end, keys no sequence reads after the last
        empty = [0] * (2 * len(chosen_spans) + 1 - len(queries))
        queries, key_lengths, bounds = queries + empty, key_lengths + empty, (longest, longest)
        fixed = {"packed_kv_used": torch.arange(2 * length) < len(kv_index)}
        kv_index = numpy.pad(kv_index, (0, 2 * length - len(kv_index)))  # key 0, read by no sequence
    return {
        "packed_kv_index": torch.from_numpy(kv_index.astype(numpy.int64)),
        "packed_cu_seq_q": cumulative(queries),
        "packed_cu_seq_k": cumulative(key_lengths),
        "packed_max_lengths": torch.empty(*bounds, 0),
        **fixed,
    }


def allowed(pair: torch.Tensor, segment: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Whether query position q may attend to key position k: the same pair, not later, and the key is in the
    prompt or in the query's own answer. The one rule every mask below is built from."""
    return (pair[q] == pair[k]) & (k <= q) & ((segment[k] == PROMPT) | (segment[k] == segment[q]))


def dense_mask(pair: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """[1, 1, T, T] boolean mask (True: attend) of a packed row; pair, segment: [T]."""
    index = torch.arange(pair.numel(), device=pair.device)
    return allowed(pair, segment, index[:, None], index[None, :])[None, None]


def allowed_per_block(pair: torch.Tensor, segment: torch.Tensor, block: int) -> torch.Tensor:
    """[query block, key block]: how many (query, key) positions of each block pair `allowed` lets attend, counted
    without the T x T mask (its memory grows with the square of the row: 1.7 GB at a 41,000-token row).

    In a packed row each pair is one run of positions (prompt, chosen, rejected; the padding is a run of prompt
    positions), so the keys a query may see are two intervals: its pair's prompt, for an answer token, and its
    own segment up to itself. Each interval's overlap with each key block is a difference of clamped ends (an
    empty interval, ending before it starts, overlaps nothing).
    """
    index = torch.arange(pair.numel(), device=pair.device)
    zero = torch.zeros_like(index)

    def run_start(starts: torch.Tensor) -> torch.Tensor:  # per position: where its run began
        return torch.where(starts, index, zero).cummax(0).values

    pair_starts = torch.cat([pair.new_ones(1, dtype=torch.bool), pair[1:] != pair[:-1]])
    pair_start = run_start(pair_starts)
    segment_start = run_start(pair_starts | torch.cat([pair_starts[:1], segment[1:] != segment[:-1]]))
    in_prompt = segment == PROMPT
    prompt_end = torch.where(in_prompt, index + 1, zero).cummax(0).values  # before pair_start: no prompt
    intervals = (
        (torch.where(in_prompt, zero, pair_start), torch.where(in_prompt, zero, prompt_end)),  # answers: the prompt
        (segment_start, index + 1),  # every position: its own segment up to itself
    )
    blocks = -(-pair.numel() // block)
    key_start = torch.arange(blocks, device=pair.device) * block
    per_query = sum(
        (torch.minimum(high[:, None], key_start + block) - torch.maximum(low[:, None], key_start)).clamp(min=0)
        for low, high in intervals
    )  # [T, key block]
    per_query = torch.nn.functional.pad(per_query, (0, 0, 0, blocks * block - pair.numel()))
    return per_query.view(blocks, block, blocks).sum(1)


def block_mask(pair: torch.Tensor, segment: torch.Tensor, block: int = 128):
    """FlexAttention's BlockMask of a packed row: the same rule, with fully masked blocks skipped.

    The tensors `create_block_mask` would build (tests/test_packing.py checks all eight), from the counts of
    `allowed_per_block` and `BlockMask.from_kv_blocks`: `create_block_mask` evaluates the rule under four nested
    vmaps, ~10 ms of host time per step whatever the device, in a step the GPU spends waiting on the host.
    """
    from torch.nn.attention.flex_attention import BlockMask

    length = pair.numel()
    counts = allowed_per_block(pair, segment, block)
    full = counts == block * block
    partial = (counts > 0) & ~full

    def ordered(blocks_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # counts, then indices kept first
        kept = blocks_kept.to(torch.int32)
        indices = torch.argsort(kept, dim=-1, descending=True, stable=True).to(torch.int32)
        return kept.sum(-1).to(torch.int32)[None, None], indices[None, None]

    def mask_mod(batch, head, q, k):
        return allowed(pair, segment, q, k)

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(length, length)
    )


class VarlenRow(NamedTuple):
    """A packed row's sequences for `varlen_attention` (see `varlen_layout`), on the device."""

    kv_index: torch.Tensor
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int
    kv_used: torch.Tensor | None = None  # fixed shapes only: which gathered keys a sequence reads

    @classmethod
    def from_batch(cls, batch: dict) -> VarlenRow:
        """From `varlen_layout`'s tensors (VARLEN_KEYS): the two ints read off packed_max_lengths' shape."""
        max_lengths = batch["packed_max_lengths"]
        return cls(batch["packed_kv_index"], batch["packed_cu_seq_q"], batch["packed_cu_seq_k"],
                   *max_lengths.shape[:2], batch.get("packed_kv_used"))  # fmt: skip


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_varlen=None,
                     **kwargs):  # fmt: skip
    """transformers' attention function for `varlen_attn`: query [1, H, T, D], key and value [1, H_kv, T, D] of a
    packed row -> ([1, T, H, D], None). On CUDA, PyTorch's FlashAttention kernel for variable-length sequences
    (`torch.nn.attention.varlen.varlen_attn`: no mask, no masked block visited, grouped K/V read as they are), in the
    dtype the layer computes in; on the CPU `varlen_attention_reference`, which computes the same."""
    if packed_varlen is None:
        raise ValueError(
            f"{VARLEN_ATTENTION} computes only the fast path's packed rows (dpolab train or eval with "
            "fast_path on); load the model with another attention implementation for anything else"
        )
    if kwargs.get("sliding_window"):  # the layout is causal over whole sequences
        raise ValueError(f"{VARLEN_ATTENTION} does not compute sliding-window attention: use flex_attention or sdpa")
    row = packed_varlen
    query = query[0].transpose(0, 1)  # [T, H, D]
    key = key[0].transpose(0, 1).index_select(0, row.kv_index)  # [Tk, H_kv, D]: the prompts' read twice
    value = value[0].transpose(0, 1).index_select(0, row.kv_index)
    if row.kv_used is not None:
        # keys no sequence reads (fixed shapes): FlashAttention's backward need not write their gradient rows (its
        # buffer is allocated, not zeroed); masked_fill's backward replaces those rows, whatever they hold (NaN
        # too), with zeros before they are added into key 0's gradient
        unread = ~row.kv_used[:, None, None]
        key, value = key.masked_fill(unread, 0), value.masked_fill(unread, 0)
    if query.device.type == "cpu":
        return sequences_attention(query, key, value, row.cu_seq_q, row.cu_seq_k, scaling)[None], None
    # v comes from its projection in the dtype the layer computes in (autocast's, or the weights'); under autocast q
    # and k arrive in float32 (the rotary embedding multiplies them in the residual's dtype)
    dtype = value.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{VARLEN_ATTENTION} (FlashAttention) computes in bf16 or fp16, not {dtype}: train with "
                         "bf16 true (float32 weights under autocast) or bfloat16 weights")  # fmt: skip
    gqa = {"enable_gqa": True} if VARLEN_TAKES_ENABLE_GQA and key.size(1) != query.size(1) else {}
    output = varlen_attn(query.to(dtype), key.to(dtype), value.to(dtype), row.cu_seq_q, row.cu_seq_k, row.max_q,
                         row.max_k, scale=scaling, window_size=(-1, 0), **gqa)  # (-1, 0): causal  # fmt: skip
    return output[None], None


def varlen_attention_reference(query, key, value, cu_seq_q, cu_seq_k, scale) -> torch.Tensor:
    """What `varlen_attn` computes, one sequence at a time with SDPA: query [Tq, H, D], key and value [Tk, H_kv, D]
    -> [Tq, H, D]; each sequence causal, aligned to the bottom right (flash-attention's rule where a sequence has
    more keys than queries: query i of q sees keys up to i + k - q)."""
    groups = query.size(1) // key.size(1)
    bounds = zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), cu_seq_k[:-1].tolist(), cu_seq_k[1:].tolist())
    outputs = [query.new_zeros(0, *query.shape[1:])]
    for q_start, q_end, k_start, k_end in bounds:
        queries, keys = q_end - q_start, k_end - k_start
        if queries == 0:  # the empty sequences that fix the count under CUDA graphs
            continue
        query_index = torch.arange(queries, device=query.device)[:, None]
        sees = torch.arange(keys, device=query.device)[None] <= query_index + keys - queries
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[q_start:q_end].transpose(0, 1),
                key[k_start:k_end].transpose(0, 1).repeat_interleave(groups, 0),
                value[k_start:k_end].transpose(0, 1).repeat_interleave(groups, 0),
                attn_mask=sees,
                scale=scale,
            ).transpose(0, 1)
        )
    return torch.cat(outputs)


@torch.library.custom_op("dpolab::sequences_attention", mutates_args=())
def sequences_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """`varlen_attention_reference` as an operator of its own (with its backward), as torch's `varlen_attn` is:
    compiled code calls it as it is, without tracing its loop over each batch's sequences anew (a recompile for
    every number of sequences) or breaking the graph (which a compiled backbone's nested region refuses)."""
    return varlen_attention_reference(query, key, value, cu_seq_q, cu_seq_k, scale)


@sequences_attention.register_fake
def _(query, key, value, cu_seq_q, cu_seq_k, scale):
    return torch.empty_like(query)


@torch.library.custom_op("dpolab::sequences_attention_backward", mutates_args=())
def sequences_attention_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def attention(query, key, value):
        return varlen_attention_reference(query, key, value, cu_seq_q, cu_seq_k, scale)

    _, gradients = torch.func.vjp(attention, query, key, value)  # keys no sequence reads: zero gradients
    return gradients(grad)


@sequences_attention_backward.register_fake
def _(grad, query, key, value, cu_seq_q, cu_seq_k, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def sequences_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.scale = inputs[5]


def sequences_attention_gradients(ctx, grad):
    return *sequences_attention_backward(grad, *ctx.saved_tensors, ctx.scale), None, None, None


sequences_attention.register_autograd(sequences_attention_gradients, setup_context=sequences_attention_setup)


# torch 2.12 and later take grouped K/V only with enable_gqa=True; torch 2.11's varlen_attn has no such argument and
# hands grouped K/V to FlashAttention as they are (`register_attention` sets this)
VARLEN_TAKES_ENABLE_GQA = False


def register_attention(implementation: str | None) -> None:
    """Make `implementation` one that transformers loads models with (call before `from_pretrained`): `varlen_attn`
    is dpolab's to register; transformers' own need nothing."""
    import inspect

    from transformers import AttentionInterface

    if implementation != VARLEN_ATTENTION:
        return
    if varlen_attn is None:
        raise DpolabError(f"attn_implementation {VARLEN_ATTENTION} needs torch 2.10 or later (torch.nn.attention."
                          f"varlen); this is torch {torch.__version__}.")  # fmt: skip
    global VARLEN_TAKES_ENABLE_GQA
    VARLEN_TAKES_ENABLE_GQA = "enable_gqa" in inspect.signature(varlen_attn).parameters
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


def attention_mask(implementation: str, pair: torch.Tensor, segment: torch.Tensor, backbone):
    """The mask a packed row needs under the backbone's attention implementation (flex_attention or sdpa; None for
    varlen_attn, whose sequences say what each token sees)."""
    if implementation == VARLEN_ATTENTION:
        return None
    if implementation == "flex_attention":
        return block_mask(pair, segment)
    mask = dense_mask(pair, segment)
    # SDPA turns a boolean mask into an additive one of the queries' dtype (-inf where masked) in every call, and each
    # layer keeps its copy for the backward: a T x T tensor per layer (24 x 75 MiB in bf16 at the bench's 6,272-token
    # rows). Made once here, the same tensor serves every layer and is kept once; the same values, so the same output.
    dtype = attention_dtype(backbone, pair.device.type)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def attention_dtype(backbone, device_type: str) -> torch.dtype:
    """The dtype the backbone's attention gets its queries in: autocast's, else its hidden states' (the embeddings')."""
    # not torch.amp.is_autocast_available: torch 2.11's dynamo broke the compiled backbone's graph there (the
    # meta device, which stands in for a GPU in the tests, is the one device type without autocast)
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return backbone.get_input_embeddings().weight.dtype


# --- the model ----------------------------------------------------------------------------------------------------


def unsupported_reason(model_config, truncation_mode: str) -> str | None:
    """Why the fast path cannot run for this model and these settings, or None when it can."""
    implementation = getattr(model_config, "_attn_implementation", None) or "sdpa"
    if implementation == "eager":  # packed: H x T^2 per layer, T = B x (a pair's tokens); padded: 2B x H x L^2
        return (
            "eager attention keeps each layer's whole scores, which on a packed row grow with the square of the "
            "pairs per micro-batch (about B/2 times what TRL's padded rows keep; sdpa or flex_attention take it)"
        )
    if implementation not in SUPPORTED_ATTENTION:
        return f"attention implementation '{implementation}' takes no custom mask (use sdpa or flex_attention)"
    if truncation_mode != "keep_start":
        return "truncation_mode keep_end keeps a different part of the prompt for chosen and rejected"
    if getattr(model_config.get_text_config(), "output_router_logits", False):
        return "mixture-of-experts router losses are not computed on packed rows"
    if getattr(model_config, "is_encoder_decoder", False):
        return "encoder-decoder models have no causal prompt to share"
    return None


def fast_path_off_reason(model_config, fast_path: bool, truncation_mode: str) -> str | None:
    """Why the fast path does not run for this model and these settings (None: it runs). `varlen_attn` computes
    only the fast path's packed rows: where the fast path does not run, that is a clear error."""
    reason = unsupported_reason(model_config, truncation_mode) if fast_path else "fast_path is false"
    if getattr(model_config, "_attn_implementation", None) == VARLEN_ATTENTION and reason is not None:
        raise DpolabError(f"attn_implementation {VARLEN_ATTENTION} computes only the fast path's packed rows, and the "
                          f"fast path is off here ({reason}): use sdpa or flex_attention.")  # fmt: skip
    return reason


def packed_backbone_forward(original_forward, attention_implementation: str):
    """The backbone's forward, which on a batch carrying packed tensors runs the packed row and returns hidden
    states in TRL's padded layout (given `packed_gather_index`; else the packed row's, [1, T, H]); any other call
    (generation, saving, TRL's padded path) is the original."""

    @functools.wraps(original_forward)
    def forward(self, *args, packed_input_ids=None, packed_position_ids=None, packed_pair=None, packed_segment=None,
                packed_gather_index=None, **kwargs):  # fmt: skip
        if packed_input_ids is None:
            return original_forward(self, *args, **kwargs)
        varlen = {name: kwargs.pop(name, None) for name in VARLEN_KEYS}
        if attention_implementation == VARLEN_ATTENTION:  # on to every layer's `varlen_attention`
            kwargs["packed_varlen"] = VarlenRow.from_batch(varlen)
        # TRL's padded layout is not computed; the answer positions are for dpolab's LM head, when TRL's runs
        for unused in ("input_ids", "attention_mask", "position_ids", *ANSWER_KEYS):
            kwargs.pop(unused, None)
        mask = attention_mask(attention_implementation, packed_pair[0], packed_segment[0], self)
        outputs = original_forward(
            self, input_ids=packed_input_ids, position_ids=packed_position_ids, attention_mask=mask, **kwargs
        )
        if packed_gather_index is None:
            return outputs
        hidden = outputs.last_hidden_state[0]  # [T, H]
        with_zero_row = torch.cat([hidden, hidden.new_zeros(1, hidden.size(-1))])  # index T: padding positions
        # index_select, not with_zero_row[index]: its backward adds rows in place where indexing's sorts every index
        # (2.5 ms a call in the H100 profile, bench/RESULTS.md); the same sums, as each token is read at most twice
        # (a prompt token: once for the chosen and once for the rejected row; the zero row's gradient is unused)
        gathered = torch.index_select(with_zero_row, 0, packed_gather_index.flatten())
        outputs.last_hidden_state = gathered.view(*packed_gather_index.shape, hidden.size(-1))  # [2B, L, H]
        return outputs

    return forward


def transformers_model(model):
    """The transformers model itself: a PEFT model's base model, or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def install(model) -> None:
    """Make `model`'s backbone take packed batches (a PEFT model: the backbone of its base model)."""
    base = transformers_model(model)
    backbone = base.base_model
    if getattr(backbone, "_dpolab_packed", False):
        return
    implementation = base.config._attn_implementation or "sdpa"
    backbone.forward = types.MethodType(packed_backbone_forward(type(backbone).forward, implementation), backbone)
    backbone._dpolab_packed = True


# TRL 1.16's DPOTrainer: the per-token outputs its fused LM head computes for the policy (`use_weighting` adds
# log_sum_sq_probs) and for a reference model, at temperature 1 in vocabulary tiles of 32,768 (trl/trainer/
# dpo_trainer.py, `add_fused_lm_head`; trl/trainer/utils.py). tests/test_packing.py compares every output with TRL's.
POLICY_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
REFERENCE_HEAD_OUTPUTS = ("log_probs",)
HEAD_VOCABULARY_TILE = 32768
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")  # fmt: skip


def answer_head_forward(fused_forward, outputs: tuple[str, ...]):
    """The model's forward (TRL's with its fused LM head) which, on a packed batch carrying its answer positions,
    runs TRL's head kernel (`trl.kernels.ChunkedLogProbFunction`) on the packed row's hidden states at those
    positions and lays the results out as TRL's head does ([2B, L - 1], zero where nothing is scored).

    Why: TRL's head finds the positions it scores with a boolean mask (`hidden_states[mask]`, `labels[mask]`) on
    CUDA, and each of those makes the host wait for the device in the middle of the step; the collator found the
    same positions on the host (`pack_batch`). Nor is the packed row gathered into TRL's padded layout first. Any
    other call (TRL's padded path, generation, a batch without answer positions) is TRL's forward."""

    @functools.wraps(fused_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, packed_answer_index=None,
                packed_answer_labels=None, packed_answer_slot=None, **kwargs):  # fmt: skip
        if not fused_lm_head or packed_answer_index is None or packed_answer_index.numel() == 0:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)  # fmt: skip
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import FusedCausalLMOutput

        kwargs.pop("packed_gather_index", None)  # the hidden states stay in the packed row
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[0]  # [T, H]
        head = self.get_output_embeddings()
        per_token = ChunkedLogProbFunction.apply(
            torch.index_select(hidden, 0, packed_answer_index), head.weight, head.bias, packed_answer_labels,
            1.0, HEAD_VOCABULARY_TILE, None, 1.0, outputs,
        )  # fmt: skip
        scored = labels[:, 1:] != -100

        def in_rows(values: torch.Tensor | None) -> torch.Tensor | None:  # [N] -> TRL's [2B, L - 1] layout
            if values is None:
                return None
            return values.new_zeros(scored.numel()).index_copy(0, packed_answer_slot, values).view(scored.shape)

        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = map(in_rows, per_token)
        count = scored.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-per_token[0].sum() / count, log_probs=log_probs, entropy=entropy,
            log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1, label_mask=scored,
        )  # fmt: skip

    return forward


def install_answer_head(trainer) -> str | None:
    """Give the trainer's policy (and reference model, if it has one) `answer_head_forward` over TRL's fused head,
    which DPOTrainer adds when it is built. Returns why TRL's head stays, or None."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return "sharded weights: TRL's LM head gathers them"
    outputs = POLICY_HEAD_OUTPUTS + (("log_sum_sq_probs",) if trainer.use_weighting else ())
    reason = install_answer_head_on(trainer.accelerator.unwrap_model(trainer.model), outputs)
    if reason is None and trainer.ref_model is not None:
        install_answer_head_on(trainer.accelerator.unwrap_model(trainer.ref_model), REFERENCE_HEAD_OUTPUTS)
    return reason


def install_answer_head_on(model, outputs: tuple[str, ...]) -> str | None:
    """`answer_head_forward` computing `outputs` over the model's TRL fused head (a PEFT model: its base model's,
    where TRL puts the head). Returns why TRL's head stays, or None."""
    transforms = [name for name in LOGIT_TRANSFORMS if getattr(model.config.get_text_config(), name, None) is not None]
    if transforms:
        return f"the model's logits are transformed ({', '.join(transforms)}): TRL's LM head computes that"
    base = transformers_model(model)
    if not getattr(base, "_dpolab_answer_head", False):
        base.forward = types.MethodType(answer_head_forward(base.forward, outputs), base)
        base._dpolab_answer_head = True
    return None


@dataclass
class PackedCollator:
    """The DPOTrainer data collator of the fast path (see `pack_batch`)."""

    pad_token_id: int
    max_length: int | None
    row_multiple: int = ROW_MULTIPLE
    varlen: bool = False  # the model's attention is varlen_attn: its sequences too (`varlen_layout`)
    fixed_shapes: bool = False  # the sequences' tensors shaped by the row's length and pairs alone (CUDA graphs)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pack_batch(examples, self.max_length, self.pad_token_id, self.row_multiple, self.varlen,
                          self.fixed_shapes)  # fmt: skip


# --- torch.compile of the decoder layers --------------------------------------------------------------------------


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's repeated blocks: its longest ModuleList whose modules are all of one class."""
    candidates = [
        modules for modules in model.modules()
        if isinstance(modules, torch.nn.ModuleList) and len(modules) > 1 and len({type(m) for m in modules}) == 1
    ]  # fmt: skip
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no repeated decoder layers to compile")
    return max(candidates, key=len)


def compile_layers(model, backend: str, mode: str | None) -> int:
    """Compile each decoder layer in place (regional compilation), with dynamic shapes from the first call.

    Why not TRL's `torch_compile` as it is: accelerate compiles the whole model when the trainer is prepared, after
    the reference pre-pass, around dpolab's packed forward and TRL's LM head; and a first compile with static shapes
    is compiled again when the next row has another length. Here every layer shares one graph (the layers run the
    same code), the pre-pass and the training forward run compiled layers, a new row length costs nothing, and the
    mask building, the gather into TRL's layout and TRL's head stay eager. The weights keep their names (in-place
    `Module.compile`), so checkpoints and final/ load as before. Returns the number of layers compiled.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend, mode=mode, dynamic=True)
    return len(layers)


def compile_backbone(model, backend: str, mode: str | None) -> None:
    """Compile the whole backbone in place as one graph with dynamic shapes: the packed row's mask, every decoder
    layer and the final norm (`dpolab train` does it for the CUDA-graph modes, `reduce-overhead` and
    `max-autotune`).

    Why not each layer under those modes: PyTorch's CUDA-graph trees expect a forward graph and then its backward;
    24 separately compiled layers leave 24 backwards pending, and PyTorch left its fast path (7.5 pairs/s on an H100
    against 71.8 without graphs, bench/RESULTS.md). The whole backbone is one forward and one backward per step,
    recorded once per row length (rows rounded to CUDA_GRAPH_ROW_MULTIPLE tokens), and replayed without launching
    its kernels from Python. The weights keep their names, as in `compile_layers`.

    Each decoder layer runs as one `torch.compiler.nested_compile_region`, which dynamo traces and inductor compiles
    once and stamps out for every layer (hierarchical compilation): traced layer by layer, the first step took 190 s
    on an H200 machine; on the CPU with inductor a 24-layer backbone compiled in 75 s against 405 s
    (bench/RESULTS.md, fifteenth section)."""
    import torch._inductor.config

    backbone = transformers_model(model).base_model
    layers = decoder_layers(backbone)
    # Dynamo's process-wide setting: without it the layers' float attributes (the norms' epsilon, attention's
    # scaling) enter the region as symbolic inputs, and dynamo broke the graph at every layer; with it they are
    # constants, as in a graph traced without the region
    torch._dynamo.config.specialize_float = True
    # inductor's process-wide setting: with the region, reusing a dead buffer for another within a compiled graph
    # gave wrong gradients (torch 2.13 on the CPU: the decoder layers' attention and the embeddings, up to 1e4x off;
    # turning buffer donation off, which pytorch/pytorch#192840 mends for regions, did not help); without reuse they
    # are eager's. The graph still frees what it no longer needs, and the allocator (or the CUDA graphs' pool) hands
    # that memory out again
    torch._inductor.config.allow_buffer_reuse = False
    region = torch.compiler.nested_compile_region(type(layers[0]).forward)  # one region: every layer reuses it
    for layer in layers:
        layer.forward = types.MethodType(region, layer)
    backbone.compile(backend=backend, mode=mode, dynamic=True)


# --- reference log-probs once -------------------------------------------------------------------------------------


@functools.cache
def reference_trainer_class():
    """TRL's DPOTrainer with its reference pre-pass kept in dpolab's on-disk cache (see the class docstring)."""
    from trl import DPOTrainer

    class PrecomputedReferenceDPOTrainer(DPOTrainer):
        """DPOTrainer whose `precompute_ref_log_probs` pre-pass is cached where `dpolab eval` and `sweep` look.

        TRL recomputes reference log-probs at every start (its own cache exists only beside file-backed datasets).
        Here they are keyed by the reference weights, the token ids, truncation and precision, so a second run on
        the same data, an eval of the run and a sweep reuse them. The values are TRL's own: each batch goes through
        `DPOTrainer.compute_ref_log_probs`. This overrides one private method of TRL 1.16, `_precompute_ref_logps`
        (TRL offers no hook for it); tests/test_packing.py fails if its signature or use changes.

        On packed batches it also computes TRL's loss and metrics without the host waiting for the device
        (`compute_loss`, `log`: public Trainer hooks).
        """

        def __init__(self, *args, reference_path: str, precision: dict, **kwargs):
            self.reference_path, self.reference_precision = reference_path, precision
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """A packed batch with precomputed reference log-probs: TRL's loss and metrics without waiting for the
            device (`loss_without_waits`). Anything else: TRL's own."""
            packed_with_reference = "packed_input_ids" in inputs and "ref_chosen_logps" in inputs
            # WPO weights and MoE router losses need outputs this does not compute: TRL's
            if return_outputs or not packed_with_reference or self.use_weighting or self.aux_loss_enabled:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return self.loss_without_waits(model, inputs)

        def loss_without_waits(self, model, inputs):
            """TRL 1.16 `DPOTrainer._compute_loss` for a batch whose reference log-probs are precomputed: the same
            forward (the model's fused LM head: `answer_head_forward` where installed, else TRL's), loss
            (`logps.batch_loss`, pinned to TRL's) and metrics, each metric kept on the device until `log` reads them
            all at once. TRL's own calls `.item()` or tests a device value 17 times in every step
            (bench/host_ops.py): each time the host waits for the device, so the next kernels are queued only once
            the device has run dry (tests/test_packing.py pins the values to TRL's)."""
            from dpolab.logps import batch_loss, length_weighted_logps

            mode = "train" if self.model.training else "eval"
            completion_mask = inputs["completion_mask"]
            shifted_mask = completion_mask[:, 1:]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            not_model_inputs = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
            model_inputs = {key: value for key, value in inputs.items() if key not in not_model_inputs}
            outputs = model(**model_inputs, use_cache=False, labels=labels, fused_lm_head=True)
            length = shifted_mask.size(1)
            logps, plain_logps, tokens = length_weighted_logps(
                outputs.log_probs[:, -length:], shifted_mask, self.ld_alpha
            )
            chosen, rejected = logps.chunk(2)
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            loss = batch_loss(
                self.loss_types, self.loss_weights, self.beta, chosen, rejected, ref_chosen, ref_rejected,
                *tokens.chunk(2), self.label_smoothing, f_divergence_type=self.f_divergence_type,
                f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.args.discopop_tau,
                policy_chosen_unweighted=plain_logps.chunk(2)[0],
            )  # fmt: skip

            # The metrics as TRL computes them (sums over every process's batch), with `x if count > 0 else 0.0`
            # as a torch.where
            metrics = self._metrics[mode]

            def summed(values: torch.Tensor) -> torch.Tensor:
                return self.accelerator.gather_for_metrics(values.sum()).sum()

            count = summed(shifted_mask)
            entropy_sum = summed(outputs.entropy[:, -length:].detach() * shifted_mask)
            metrics["entropy"].append(torch.where(count > 0, entropy_sum / count, 0.0))
            if mode == "train":
                self._total_train_tokens += summed(inputs["attention_mask"]) // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
            answer_masks = shifted_mask.chunk(2)  # chosen, rejected
            counts = [summed(answer_mask) for answer_mask in answer_masks]
            mean_logits = outputs.mean_logits[:, -length:].chunk(2)
            for name, logits, answer_mask, count in zip(("logits/chosen", "logits/rejected"), mean_logits,
                                                        answer_masks, counts):  # fmt: skip
                total = summed(logits * answer_mask)
                metrics[name].append(torch.where(count > 0, total.double() / count, 0.0))  # TRL: Python floats
            correct = summed(outputs.is_top1[:, -length:].chunk(2)[0] & answer_masks[0].bool())
            metrics["mean_token_accuracy"].append(torch.where(counts[0] > 0, correct / counts[0], 0.0))
            chosen_rewards = self.beta * (chosen - ref_chosen).detach()
            rejected_rewards = self.beta * (rejected - ref_rejected).detach()
            gather = self.accelerator.gather
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean())
            metrics["logps/chosen"].append(gather(chosen.detach()).mean())
            metrics["logps/rejected"].append(gather(rejected.detach()).mean())
            return loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            """TRL's log, after reading the metrics `loss_without_waits` kept on the device in one transfer."""
            mode = "train" if self.model.training else "eval"
            kept = [(values, i) for values in self._metrics[mode].values()
                    for i, value in enumerate(values) if isinstance(value, torch.Tensor)]  # fmt: skip
            if kept:  # float64 holds every float32 and token count exactly, as `.item()` would return them
                read = torch.stack([values[i].detach().double() for values, i in kept]).tolist()
                for (values, i), value in zip(kept, read):
                    values[i] = value
            super().log(logs, start_time)

        def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
            from dpolab.models import (
                read_reference_cache,
                reference_cache_path,
                token_ids_digest,
                write_reference_cache,
            )

            if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # sharded weights: TRL's own collective pass
                return super()._precompute_ref_logps(dataset, name, batch_size)
            ids = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).iter(batch_size=1024)
            path = reference_cache_path(
                self.reference_path, token_ids_digest(ids), max_length=self.args.max_length,
                truncation_mode=self.args.truncation_mode, **self.reference_precision,
            )  # fmt: skip
            # LD-DPO's weighted sums are not the plain sums `dpolab eval` caches: computed, not cached
            cacheable = self.args.ld_alpha is None
            with self.accelerator.main_process_first():  # the main process computes; the others read its result
                logps = read_reference_cache(path) if cacheable else None
                if logps is None or len(logps["chosen"]) != len(dataset):
                    logps = self.reference_pass(dataset, name, batch_size)
                    if cacheable and self.accelerator.is_main_process:
                        write_reference_cache(path, logps)
            return dataset.add_column("ref_chosen_logps", logps["chosen"]).add_column(
                "ref_rejected_logps", logps["rejected"]
            )

        def reference_pass(self, dataset, name: str, batch_size: int) -> dict:
            """TRL's reference log-probs of every pair, batch by batch through this trainer's collator (on the fast
            path through `answer_head_forward`, as training runs), read back once at the end: the host never waits
            for the device in between, so it queues each batch while the device runs the one before."""
            from torch.utils.data import DataLoader
            from tqdm.auto import tqdm

            from dpolab.logps import read_per_pair

            if isinstance(self.data_collator, PackedCollator):
                install_answer_head(self)  # the reason, where TRL's head stays, is printed once the trainer is built
            device = self.accelerator.device
            columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
            loader = DataLoader(columns, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                                pin_memory=device.type == "cuda")  # fmt: skip
            model = self.ref_model or self.model
            per_batch = []  # (chosen, rejected, chosen tokens, rejected tokens), on the device
            try:
                for batch in tqdm(loader, desc=f"Reference log-probs ({name})", unit="batch"):
                    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                    chosen, rejected = self.compute_ref_log_probs(model, batch)
                    per_batch.append((chosen.float(), rejected.float(),
                                      *batch["completion_mask"][:, 1:].sum(1).chunk(2)))  # fmt: skip
            except torch.OutOfMemoryError:
                doing = (f"in the reference pre-pass ({name} data, {batch_size} pairs per batch), "
                         "before training started")  # fmt: skip
                at_one = "run the same command with --precompute_ref_log_probs false (the reference in each step)"
                raise out_of_memory_error(doing, batch_size, at_one, "--precompute_ref_batch_size") from None
            result = read_per_pair(per_batch, ("chosen", "rejected", "chosen_tokens", "rejected_tokens"))
            result["chosen_unweighted"] = result["chosen"]  # cached only without ld_alpha: the plain sums
            return result

    return PrecomputedReferenceDPOTrainer
