"""Generation from chat prompts: the chat template applied, batched, greedy or seeded sampling."""

from __future__ import annotations


def generate_responses(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """The model's reply to each conversation (prompt templated with `add_generation_prompt=True`)."""
    import torch
    from tqdm.auto import tqdm

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    torch.manual_seed(seed)
    replies = []
    try:
        for start in tqdm(range(0, len(conversations), batch_size), desc="Generating", disable=not progress):
            batch = conversations[start : start + batch_size]
            inputs = tokenizer.apply_chat_template(
                batch, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
            ).to(model.device)
            with torch.no_grad():
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return replies
