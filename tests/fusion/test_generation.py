"""Decoder.generate: cache vs no cache, batched vs one by one, sampling options, stop tokens."""
import pytest
import torch

import fusion
from fusion.generation import left_pad, select_next_token


def make_decoder(seed=0):
    torch.manual_seed(seed)
    config = fusion.DecoderConfig(vocab_size=61, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                  head_dim=16, intermediate_size=32, intermediate_size_mlp=48, num_experts=4,
                                  attention_chunk_size=8, floor_scale=4, attn_scale=0.5, initializer_range=0.15)
    return fusion.Decoder(config).eval()


def greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[5, 9, 2, 33, 17, 8, 40, 41, 3, 12, 7], [19, 4], [50, 51, 52, 53, 54, 55]]


def test_greedy_with_cache_equals_without_cache():
    model = make_decoder()
    for prompt in PROMPTS:
        cached = model.generate([prompt], max_new_tokens=14)[0].tolist()
        assert cached == greedy_without_cache(model, prompt, 14)


def test_batched_generation_equals_one_by_one():
    model = make_decoder()
    batched = model.generate(PROMPTS, max_new_tokens=14, pad_id=0)
    for row, prompt in enumerate(PROMPTS):
        single = model.generate([prompt], max_new_tokens=14)[0]
        assert batched[row].tolist() == single.tolist()


def test_stop_tokens_end_each_sample_separately():
    model = make_decoder()
    free = model.generate(PROMPTS, max_new_tokens=10)
    stop = int(free[0, 2])  # the third token of sample 0
    out = model.generate(PROMPTS, max_new_tokens=10, stop_ids=[stop], pad_id=-1)
    row0 = out[0].tolist()
    assert row0[:3] == free[0, :3].tolist() and row0[3:] == [-1] * (out.shape[1] - 3)
    for row in range(1, 3):  # the others go on until they emit the stop token themselves
        expected = free[row].tolist()
        if stop in expected:
            expected = expected[: expected.index(stop) + 1]
        assert out[row].tolist()[: len(expected)] == expected


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    model = make_decoder()
    a = model.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5,
                       generator=torch.Generator().manual_seed(3))
    b = model.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    top1 = model.generate(PROMPTS, max_new_tokens=8, do_sample=True, top_k=1,
                          generator=torch.Generator().manual_seed(4))
    assert torch.equal(top1, model.generate(PROMPTS, max_new_tokens=8))  # top-1 sampling is greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(select_next_token(logits, True, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 never drawn
    draws = {int(select_next_token(logits, True, top_p=0.4, generator=g)) for _ in range(50)}
    assert draws == {0}


def test_bad_arguments():
    model = make_decoder()
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1, 2], []])
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    right = torch.flip(mask, dims=[1])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, attention_mask=right)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], do_sample=True, temperature=0)
    # options that cannot work are named before any token is computed (not a TypeError deep inside torch)
    for options, message in ((dict(do_sample=True, temperature=None), r"temperature must be a number > 0"),
                             (dict(do_sample=True, top_p=-0.5), r"top_p must be a number in \(0, 1\]"),
                             (dict(do_sample=True, top_p=1.5), r"top_p must be a number in \(0, 1\]"),
                             (dict(do_sample=True, top_k=2.0), r"top_k must be an integer"),
                             (dict(do_sample=True, generator=0), r"generator must be a torch.Generator"),
                             (dict(stop_ids="a"), r"stop_ids must be integer token ids"),
                             (dict(max_new_tokens=2.5), r"max_new_tokens must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            model.generate([[1, 2]], **options)
    with pytest.raises(ValueError, match="temperature must be > 0"):  # the helper on its own too
        select_next_token(torch.zeros(1, 4), True, temperature=0)
    # one-element tensors are numbers
    sampled = model.generate([[1, 2]], max_new_tokens=torch.tensor(3), do_sample=True, temperature=torch.tensor(1.5),
                             top_k=torch.tensor(5), generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 3)


def test_sampling_options_without_do_sample_warn_that_decoding_is_greedy():
    """temperature / top_k / top_p given without do_sample=True would otherwise be silently ignored."""
    model = make_decoder()
    greedy = model.generate(PROMPTS, max_new_tokens=4)
    with pytest.warns(UserWarning, match=r"temperature=3.0, top_p=0.5 only shape sampling, and do_sample is False: "
                                         r"decoding greedily; pass do_sample=True"):
        same = model.generate(PROMPTS, max_new_tokens=4, temperature=3.0, top_p=0.5)
    assert torch.equal(same, greedy)
    with pytest.warns(UserWarning, match=r"generator only shape sampling"):
        assert torch.equal(model.generate(PROMPTS, max_new_tokens=4, generator=torch.Generator()), greedy)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults, and sampling options with do_sample=True, do not warn
        model.generate(PROMPTS, max_new_tokens=2)
        model.generate(PROMPTS, max_new_tokens=2, do_sample=True, temperature=3.0,
                       generator=torch.Generator().manual_seed(0))


def test_a_decoder_alone_stops_at_its_configs_eos_token():
    """A decoder loaded from a Hugging Face folder knows its eos_token_id: generate stops there by default
    (stop_ids=() never stops early, as before)."""
    model = make_decoder()
    free = model.generate([PROMPTS[0]], max_new_tokens=12, stop_ids=())[0].tolist()
    model.config.eos_token_id = free[2]
    stopped = model.generate([PROMPTS[0]], max_new_tokens=12)[0].tolist()
    assert stopped[:3] == free[:3] and len(stopped) == 3
    model.config.eos_token_id = [free[1], 60]
    assert len(model.generate([PROMPTS[0]], max_new_tokens=12)[0]) == 2
    assert model.generate([PROMPTS[0]], max_new_tokens=12, stop_ids=())[0].tolist() == free


def test_sampling_temperature_sharpens_or_flattens_the_distribution():
    """Sampling draws from softmax(logits / temperature): over 2000 seeded draws from the probabilities
    [0.5, 0.3, 0.15, 0.05], a temperature of 0.05 draws (almost) only the likeliest token, 1 draws each token
    at its probability, and 10 draws nearly uniformly (each token's share ~ p ** (1 / 10), normalised)."""
    probabilities = [0.5, 0.3, 0.15, 0.05]
    logits = torch.log(torch.tensor([probabilities])).expand(2000, 4)

    def shares(temperature):
        drawn = select_next_token(logits, True, temperature=temperature, generator=torch.Generator().manual_seed(0))
        return [float((drawn == token).float().mean()) for token in range(4)]

    assert shares(0.05)[0] >= 0.995  # 0.3 / 0.5 to the 20th: a draw in ~27000 is not token 0
    assert shares(1.0) == pytest.approx(probabilities, abs=0.03)
    flattened = [p ** 0.1 for p in probabilities]
    expected = [f / sum(flattened) for f in flattened]  # [0.275, 0.262, 0.244, 0.219]
    assert shares(10.0) == pytest.approx(expected, abs=0.03)
    assert shares(10.0)[3] >= 0.19


def test_malformed_prompts_are_named_before_any_token_is_computed():
    """A flat list of ids, a list of strings, an attention_mask of another shape than the prompts (or one given
    with unpadded lists, which are padded here) and a None pad_id are each a ValueError saying what generate
    expects, not a TypeError or a torch shape error from inside the decoder (or a mask silently ignored)."""
    model = make_decoder()
    for prompts in ([5, 9, 2], ["ab", "c"], [[5, 9], [2.5]], [[5, 9], None]):
        with pytest.raises(ValueError, match=r"generate: input_ids must be a list of prompts, each a list of integer "
                                             r"token ids"):
            model.generate(prompts, max_new_tokens=2)
    ids = torch.tensor([[5, 9, 2]])
    for mask in (torch.ones(1, 2), torch.ones(2, 3), torch.ones(3)):
        with pytest.raises(ValueError, match=r"generate: attention_mask must have the shape of the prompts \(1, 3\), "
                                             r"got \(" + ", ".join(map(str, mask.shape))):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="lists of token ids are padded here, so leave attention_mask out"):
        model.generate([[5, 9]], attention_mask=torch.tensor([[0, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=2)
    for prompts in ([[5, 9], [2]], torch.tensor([[5, 9]])):  # lists are padded with it, tensors' ended rows too
        with pytest.raises(ValueError, match=r"pad_id must be an integer token id, got None"):
            model.generate(prompts, pad_id=None, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"pad_id must be an integer token id, got 'x'"):
        fusion.generation.left_pad([[1, 2]], "x")
    # well-formed prompts in any integer form still work: tuples, numpy and tensor rows
    import numpy as np
    expected = model.generate([[5, 9, 2], [7]], max_new_tokens=3).tolist()
    assert model.generate(((5, 9, 2), (7,)), max_new_tokens=3).tolist() == expected
    assert model.generate([np.array([5, 9, 2]), torch.tensor([7])], max_new_tokens=3).tolist() == expected


def test_stop_together_decides_when_a_batch_ends_and_changes_no_samples_tokens():
    """`stop_together` (what processes generating in step with one sharded model pass: True once every
    process's samples have stopped) is asked after each token whether the batch ends: generation goes on past
    its own samples' stops (those rows then hold pad_id) or ends early, and the tokens it keeps are the same."""
    model = make_decoder()
    free = model.generate(PROMPTS, max_new_tokens=8, stop_ids=())
    stop = free[:, 1].tolist()  # every sample stops by its second token
    alone = model.generate(PROMPTS, max_new_tokens=8, stop_ids=stop, pad_id=-1)
    assert alone.shape[1] <= 2
    asked = []

    def others_go_on(done):
        asked.append(done)
        return False

    together = model.generate(PROMPTS, max_new_tokens=8, stop_ids=stop, pad_id=-1, stop_together=others_go_on)
    assert together.shape[1] == 8 and len(asked) == 8  # asked after every token
    assert together[:, :alone.shape[1]].equal(alone) and (together[:, alone.shape[1]:] == -1).all()
    assert asked[alone.shape[1] - 1:] == [True] * (9 - alone.shape[1])  # all had stopped; it went on as told
    ended = model.generate(PROMPTS, max_new_tokens=8, stop_ids=(), stop_together=lambda done: True)
    assert ended.equal(free[:, :1])
    assert model.generate(PROMPTS, max_new_tokens=8, stop_ids=stop, pad_id=-1,
                          stop_together=lambda done: done).equal(alone)
