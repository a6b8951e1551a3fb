"""Decoding with a KV cache: one prefill, then one token per step; greedy or sampled (temperature,
top-k, top-p); per-sample stop tokens. Batches are left-padded so every sample's next token sits in
the last column, and each sample keeps its own positions.
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterable
from typing import Sequence

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> (ids [B, T], attention_mask [B, T]) padded on the left. Each prompt may be any
    iterable of integers (a list, a tuple, a numpy array, a 1-D tensor); anything else is a ValueError."""
    try:
        rows = [[_token_id(t) for t in seq] for seq in sequences]
    except TypeError:
        raise ValueError("generate: input_ids must be a list of prompts, each a list of integer token ids (one "
                         "prompt: [ids]), or a [batch, tokens] tensor") from None
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    pad_id = _pad_id(pad_id)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, seq in enumerate(rows):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def _token_id(value) -> int:
    """An integer (a Python or numpy int, a one-element integer tensor) as an int; TypeError for anything else,
    a bool included."""
    try:
        if not isinstance(value, bool):
            return operator.index(value)
    except TypeError:
        pass
    raise TypeError(value)


def _pad_id(pad_id) -> int:
    try:
        return _token_id(pad_id)
    except TypeError:
        raise ValueError(f"generate: pad_id must be an integer token id, got {pad_id!r}") from None


def stop_id_tuple(stop_ids: int | Iterable[int] | torch.Tensor | None) -> tuple[int, ...]:
    """Stop tokens as a tuple of ints, from an int, any iterable of integers (a list, a generator, numpy) or a
    tensor; None -> (). Anything else is a ValueError naming it."""
    if stop_ids is None:
        return ()
    try:
        return (_token_id(stop_ids),)
    except TypeError:
        pass
    if torch.is_tensor(stop_ids):
        stop_ids = stop_ids.flatten().tolist()
    if isinstance(stop_ids, (str, bytes, bool)) or not isinstance(stop_ids, Iterable):
        raise ValueError(f"generate: stop_ids must be integer token ids (an int or a list of ints), got a "
                         f"{type(stop_ids).__name__}")
    items = list(stop_ids)
    try:
        return tuple(_token_id(item) for item in items)
    except TypeError as err:
        raise ValueError(f"generate: stop_ids must be integer token ids, got {err.args[0]!r} in {items!r}") from None


def check_sampling_options(do_sample: bool, temperature, top_k, top_p, generator) -> None:
    """A clear ValueError for a sampling option that cannot work (before any token is computed), and a warning
    for options that only shape sampling when do_sample is False."""
    if not do_sample:
        given = [f"{k}={v}" for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
                 if v is not None and (k != "temperature" or v != 1.0)]
        if generator is not None:
            given.append("generator")
        if given:
            warnings.warn(f"generate: {', '.join(given)} only shape sampling, and do_sample is False: decoding "
                          f"greedily; pass do_sample=True to sample", UserWarning, stacklevel=4)
        return
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a number > 0 when sampling, got {temperature!r}; use do_sample=False "
                         f"for greedy decoding")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 1 (0 or None: no top-k filter), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (1 or None: no nucleus filter), got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def select_next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(decoder, *, input_ids=None, inputs_embeds: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: Sequence[int] | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None, return_logprobs: bool = False,
             stop_together: Callable[[bool], bool] | None = None):
    """Generate up to `max_new_tokens` tokens per sample; returns the new tokens [B, n].

    With `return_logprobs=True`, returns `(tokens, logprobs)`: the log-probability (under the
    unmodified model distribution) of each returned token, 0 after a sample has stopped.

    The prompt is `input_ids` ([B, T] tensor, or a list of id lists, left-padded here) or
    `inputs_embeds` [B, T, D]; `attention_mask` marks real tokens (left padding only). A sample stops
    after it emits one of `stop_ids` (an int or any iterable of ints; the stop token is included); later
    columns hold `pad_id`.

    Greedy decoding gives each sample the tokens it would get alone. Sampled rows share one random stream
    (`generator`, or torch's global one): a seed reproduces a call with the same prompts in the same batch,
    and a sample's tokens change with the rows batched beside it.

    `stop_together`, when given, is called after each step with whether every sample of this call has
    stopped, and generation ends when it returns True (or at `max_new_tokens`). Processes that generate
    together with one FSDP2-sharded model, each on its own prompts, pass one that is True only once every
    process's samples have stopped (`fusion.distributed.DistContext.all_done`), with the same `max_new_tokens`:
    each then runs as many forwards as the others (each forward gathers weights from all of them, and a
    process that stopped first would leave the others waiting forever). A sample's tokens are its own either way.
    """
    max_new_tokens, temperature, top_k, top_p = (x.item() if torch.is_tensor(x) and x.ndim == 0 else x
                                                 for x in (max_new_tokens, temperature, top_k, top_p))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling_options(do_sample, temperature, top_k, top_p, generator)
    stop_ids = stop_id_tuple(stop_ids)
    pad_id = _pad_id(pad_id)
    if input_ids is not None and not torch.is_tensor(input_ids):
        if attention_mask is not None:
            raise ValueError("generate: attention_mask goes with a padded tensor of input_ids; lists of token ids "
                             "are padded here, so leave attention_mask out")
        input_ids, attention_mask = left_pad(input_ids, pad_id)
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt is None or prompt.ndim != (2 if input_ids is not None else 3):
        expected = "input_ids [batch, tokens] (one prompt: ids[None])" if input_ids is not None else \
            "inputs_embeds [batch, tokens, hidden]"
        got = "nothing" if prompt is None else f"shape {tuple(prompt.shape)}"
        raise ValueError(f"generate: expected {expected}, got {got}")
    B, T = prompt.shape[:2]
    if T == 0:
        raise ValueError("generate: every prompt needs at least one token")
    device = decoder.embed_tokens.weight.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"generate: attention_mask must have the shape of the prompts {(B, T)}, got "
                         f"{tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(device)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate: prompts must be left-padded (the last column of attention_mask must be all 1)")
    if max_new_tokens == 0:
        empty = torch.empty(B, 0, dtype=torch.long, device=device)
        return (empty, empty.float()) if return_logprobs else empty

    cache = decoder.new_cache(B, T + max_new_tokens)
    out = decoder(input_ids=input_ids.to(device) if input_ids is not None else None,
                  inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, logits_to_keep=1)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens, logprobs = [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        token = select_next_token(logits, do_sample, temperature, top_k, top_p, generator)
        new_tokens.append(torch.where(finished, torch.full_like(token, pad_id), token))
        if return_logprobs:
            chosen = logits.float().log_softmax(-1).gather(1, token[:, None])[:, 0]
            logprobs.append(torch.where(finished, torch.zeros_like(chosen), chosen))
        finished |= torch.isin(token, stops)
        done = bool(finished.all())
        if stop_together is not None:
            done = bool(stop_together(done))
        if done or step == max_new_tokens - 1:
            break
        # finished samples keep decoding (their outputs are discarded): it keeps the batch rectangular
        out = decoder(input_ids=token[:, None], cache=cache, logits_to_keep=1)
    tokens = torch.stack(new_tokens, dim=1)
    return (tokens, torch.stack(logprobs, dim=1)) if return_logprobs else tokens
