"""Batched generation from token-id prompts: left padding, KV cache, stop at end of turn or EOS.

Method-agnostic: eval.py decodes greedily, the sequence-level and on-policy scripts sample. The
caller renders and tokenizes the prompts (with the chat template's generation prompt) and chooses
the stop ids, usually `ChatEncoder.end_of_turn_token_id` plus the tokenizer's EOS.

Every model decodes the same way whatever its `generation_config.json` says (no repetition
penalty, no top-k, no beam search), so models can be compared side by side.
"""

from dataclasses import dataclass

import torch


@dataclass
class Completion:
    token_ids: list  # generated ids, cut before the first stop token
    finish_reason: str  # "stop" (a stop token was generated) or "length" (max_new_tokens reached)

    @property
    def num_generated(self):
        """Tokens the model produced, the stop token included."""
        return len(self.token_ids) + (self.finish_reason == "stop")


def left_pad(prompts_token_ids, pad_token_id):
    """(input_ids, attention_mask) of shape (B, longest prompt), padded on the left so every row's
    next token is generated at the same, last position."""
    length = max(len(ids) for ids in prompts_token_ids)
    input_ids = torch.full((len(prompts_token_ids), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts_token_ids), length), dtype=torch.long)
    for row, ids in enumerate(prompts_token_ids):
        if ids:
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1
    return input_ids, attention_mask


def cut_at_stop(new_token_ids, stop_token_ids):
    """Completion of one row: the ids before the first stop token, and why generation ended."""
    for position, token_id in enumerate(new_token_ids):
        if token_id in stop_token_ids:
            return Completion(new_token_ids[:position], "stop")
    return Completion(list(new_token_ids), "length")


def generation_config(max_new_tokens, stop_token_ids, pad_token_id, temperature, top_p):
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
        if temperature > 0 else {"do_sample": False}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1, repetition_penalty=1.0,
        no_repeat_ngram_size=0, eos_token_id=list(stop_token_ids), pad_token_id=pad_token_id,
        use_cache=True, **sampling)


@torch.no_grad()
def generate(model, tokenizer, prompts_token_ids, max_new_tokens, stop_token_ids,
             temperature=0.0, top_p=1.0, batch_size=8, progress=True, desc="generating",
             synced_gpus=None, bar=None):
    """Complete every prompt; returns one `Completion` per prompt, in the prompts' order.

    prompts_token_ids: list of lists of token ids (already rendered with the chat template).
    temperature 0 = greedy decoding; otherwise sampling at that temperature with nucleus `top_p`.
    Prompts are batched by length (longest first, so running out of memory happens at once) to
    limit padding; each row stops at its first stop token or after `max_new_tokens`.
    synced_gpus: keep running forward passes until every process is done (needed when the
    weights are sharded, see common/sharding.py); None lets transformers decide.
    bar: a caller's tqdm bar to advance once per batch instead of showing one of our own.
    """
    from tqdm.auto import tqdm

    if not prompts_token_ids:
        return []
    stop_token_ids = {int(t) for t in stop_token_ids if t is not None}
    if not stop_token_ids:
        raise ValueError("generate() needs at least one stop token id")
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = next(iter(stop_token_ids))  # padded positions are masked out anyway
    config = generation_config(max_new_tokens, stop_token_ids, pad_token_id, temperature, top_p)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    order = sorted(range(len(prompts_token_ids)), key=lambda i: -len(prompts_token_ids[i]))
    completions = [None] * len(prompts_token_ids)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if bar is not None:
        bar.set_postfix_str(desc)
    for batch_indices in (batches if bar is not None else
                          tqdm(batches, desc=desc, disable=not progress, leave=False)):
        input_ids, attention_mask = left_pad([prompts_token_ids[i] for i in batch_indices],
                                             pad_token_id)
        output = model.generate(input_ids=input_ids.to(device),
                                attention_mask=attention_mask.to(device),
                                generation_config=config, synced_gpus=synced_gpus)
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        for index, row_tokens in zip(batch_indices, new_tokens):
            completions[index] = cut_at_stop(row_tokens, stop_token_ids)
        if bar is not None:
            bar.update()
    model.train(was_training)
    return completions
