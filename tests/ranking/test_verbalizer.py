import pytest
import torch
from peft import LoraConfig, get_peft_model

from llamarec.errors import LlamarecError
from llamarec.ranking.prompt import LETTERS, PromptBuilder, encode
from llamarec.ranking.verbalizer import (
    LetterScorer,
    length_buckets,
    next_token_logits,
    pad_batch,
    permutation_average,
    resolve_letter_ids,
    seeded_orders,
)

RESPONSE = "### Instruction:\nPick.\n\n### Response:\n"


def make_prompts(tokenizer, n_prompts=5):
    """Prompts of clearly different lengths, 20 candidates each."""
    builder = PromptBuilder(tokenizer)
    return [
        builder.build([f"history item {i}-{j}" for j in range(1 + 3 * i)],
                      [f"cand {i}{letter}" for letter in LETTERS])
        for i in range(n_prompts)
    ]


def reference_scores(model, tokenizer, prompts, letter_ids):
    """The model's own full forward pass, one unpadded prompt at a time."""
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([encode(tokenizer, prompt)])
            rows.append(model(input_ids=ids).logits[0, -1, letter_ids])
    return torch.stack(rows)


@pytest.mark.parametrize("bos", [False, True])
def test_letter_ids_of_the_char_tokenizer(make_char_tokenizer, bos):
    tokenizer = make_char_tokenizer(bos=bos)
    ids = resolve_letter_ids(tokenizer, RESPONSE)
    assert ids == tokenizer.convert_tokens_to_ids(list(LETTERS))
    assert resolve_letter_ids(tokenizer, RESPONSE, n=3) == ids[:3]


@pytest.mark.slow
def test_letter_ids_of_smollm2_after_the_response_marker(smollm2_tokenizer):
    assert resolve_letter_ids(smollm2_tokenizer, RESPONSE) == list(range(49, 69))


@pytest.mark.slow
def test_letter_after_a_space_is_not_a_single_extra_token_for_smollm2(smollm2_tokenizer):
    # "### Response: " + "A" merges the space into " A": the prompt's last token changes.
    with pytest.raises(LlamarecError, match="'A'"):
        resolve_letter_ids(smollm2_tokenizer, "### Response: ")


def test_letter_that_merges_with_the_prompt_raises(make_char_tokenizer):
    tokenizer = make_char_tokenizer(merges=[("\n", "B")])
    with pytest.raises(LlamarecError, match=r"letter 'B'.*'\\nB'"):
        resolve_letter_ids(tokenizer, RESPONSE)


def test_letters_sharing_a_token_raise(make_char_tokenizer):
    tokenizer = make_char_tokenizer(drop="CD")  # both become the unknown token
    with pytest.raises(LlamarecError, match="distinct"):
        resolve_letter_ids(tokenizer, RESPONSE)


def test_more_letters_than_the_alphabet_raise(char_tokenizer):
    with pytest.raises(LlamarecError, match="1 to 20"):
        resolve_letter_ids(char_tokenizer, RESPONSE, n=21)


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_buckets_group_similar_lengths_and_cover_every_index():
    lengths = [9, 1, 7, 3, 8, 2, 5]
    buckets = length_buckets(lengths, batch_size=3)
    assert [len(b) for b in buckets] == [3, 3, 1]
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in buckets for i in b]
    assert flat == sorted(lengths)


def test_scores_equal_the_models_own_last_position_logits(char_tokenizer, make_tiny_llama):
    model = make_tiny_llama(len(char_tokenizer))
    prompts = make_prompts(char_tokenizer)
    letter_ids = resolve_letter_ids(char_tokenizer, prompts[0])
    expected = reference_scores(model, char_tokenizer, prompts, letter_ids)
    batched = LetterScorer(model, char_tokenizer, letter_ids, batch_size=3).score(prompts)
    single = LetterScorer(model, char_tokenizer, letter_ids, batch_size=1).score(prompts)
    assert batched.shape == (len(prompts), 20) and batched.dtype == torch.float32
    torch.testing.assert_close(single, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched, expected, atol=1e-4, rtol=0)
    assert expected.std() > 0.1  # the check above is not trivially true


def test_right_padding_would_read_the_wrong_position(char_tokenizer, make_tiny_llama):
    model = make_tiny_llama(len(char_tokenizer))
    prompts = make_prompts(char_tokenizer, 2)
    letter_ids = resolve_letter_ids(char_tokenizer, prompts[0])
    expected = reference_scores(model, char_tokenizer, prompts, letter_ids)
    ids, mask = pad_batch([encode(char_tokenizer, p) for p in prompts], 0, side="right")
    with torch.no_grad():
        wrong = model(input_ids=ids, attention_mask=mask).logits[:, -1, letter_ids]
    torch.testing.assert_close(wrong[1], expected[1], atol=1e-4, rtol=0)  # the longest prompt
    assert (wrong[0] - expected[0]).abs().max() > 0.1  # the shorter one reads padding


def test_next_token_logits_is_differentiable_for_training(char_tokenizer, make_tiny_llama):
    model = make_tiny_llama(len(char_tokenizer))
    sequences = [encode(char_tokenizer, p) for p in make_prompts(char_tokenizer, 2)]
    logits = next_token_logits(model, sequences, pad_id=0)
    assert logits.shape == (2, len(char_tokenizer))
    logits[:, 5].sum().backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_probabilities_are_a_softmax_over_the_letters(char_tokenizer, make_tiny_llama):
    model = make_tiny_llama(len(char_tokenizer))
    prompts = make_prompts(char_tokenizer, 2)
    scorer = LetterScorer(model, char_tokenizer, resolve_letter_ids(char_tokenizer, prompts[0]))
    probs = scorer.probabilities(prompts)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(probs, scorer.score(prompts).softmax(-1))


def test_scoring_through_a_peft_model_in_eval_mode(char_tokenizer, make_tiny_llama):
    model = make_tiny_llama(len(char_tokenizer))
    config = LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    lora = get_peft_model(model, config)
    for name, param in lora.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; make it change the outputs
            torch.nn.init.normal_(param, std=0.5)
    prompts = make_prompts(char_tokenizer, 3)
    letter_ids = resolve_letter_ids(char_tokenizer, prompts[0])
    lora.eval()
    expected = reference_scores(lora, char_tokenizer, prompts, letter_ids)
    lora.train()  # scoring must switch dropout off, then restore the mode
    scores = LetterScorer(lora, char_tokenizer, letter_ids, batch_size=3).score(prompts)
    assert lora.training
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    lora.eval()
    with lora.disable_adapter():
        base = reference_scores(lora, char_tokenizer, prompts, letter_ids)
    assert (base - expected).abs().max() > 0.01


@pytest.mark.slow
def test_scores_with_the_smollm2_tokenizer(smollm2_tokenizer, make_tiny_llama):
    model = make_tiny_llama(len(smollm2_tokenizer))
    prompts = make_prompts(smollm2_tokenizer, 3)
    letter_ids = resolve_letter_ids(smollm2_tokenizer, prompts[0])
    assert letter_ids == list(range(49, 69))
    expected = reference_scores(model, smollm2_tokenizer, prompts, letter_ids)
    scores = LetterScorer(model, smollm2_tokenizer, letter_ids, batch_size=3).score(prompts)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


CONTENT = torch.arange(20, dtype=torch.float32)  # candidate i is worth i
POSITION_BIAS = torch.linspace(100.0, 0.0, 20)  # the first position is strongly preferred


def fake_score_fn(bias: torch.Tensor):
    def score_fn(orders):
        return torch.stack([CONTENT[torch.tensor(order)] + bias for order in orders])

    return score_fn


def test_content_only_scores_are_unchanged_by_permutation_averaging():
    result = permutation_average(fake_score_fn(torch.zeros(20)), seeded_orders(20, 7, seed=1))
    torch.testing.assert_close(result, CONTENT)


def test_position_bias_is_removed_by_averaging_over_all_cyclic_shifts():
    orders = [[(j + shift) % 20 for j in range(20)] for shift in range(20)]
    result = permutation_average(fake_score_fn(POSITION_BIAS), orders)
    torch.testing.assert_close(result - result.mean(), CONTENT - CONTENT.mean())
    biased = permutation_average(fake_score_fn(POSITION_BIAS), [list(range(20))])
    assert biased.argmax() == 0  # a single pass ranks the first shown candidate on top


def bias_left(scores: torch.Tensor) -> torch.Tensor:
    """How far scores are from the content scores, up to a constant shift."""
    error = scores - CONTENT
    return (error - error.mean()).abs().max()


def test_seeded_permutations_reduce_position_bias():
    identity_only = permutation_average(fake_score_fn(POSITION_BIAS), seeded_orders(20, 1))
    averaged = permutation_average(fake_score_fn(POSITION_BIAS), seeded_orders(20, 400))
    assert bias_left(averaged) < bias_left(identity_only) / 5


def test_permutation_average_keeps_batch_dimensions():
    def score_fn(orders):  # two users sharing the orders: [orders, users, candidates]
        per_user = torch.stack([CONTENT, -CONTENT])
        return torch.stack([per_user[:, torch.tensor(order)] for order in orders])

    result = permutation_average(score_fn, seeded_orders(20, 3))
    torch.testing.assert_close(result, torch.stack([CONTENT, -CONTENT]))


def test_seeded_orders_are_reproducible_permutations_starting_with_identity():
    orders = seeded_orders(20, 5, seed=3)
    assert orders == seeded_orders(20, 5, seed=3) and orders != seeded_orders(20, 5, seed=4)
    assert orders[0] == list(range(20))
    assert all(sorted(order) == list(range(20)) for order in orders)


def test_permutation_average_rejects_bad_orders_and_shapes():
    with pytest.raises(ValueError, match="not a permutation"):
        permutation_average(fake_score_fn(torch.zeros(20)), [[0] * 20])
    with pytest.raises(ValueError, match="expected"):
        permutation_average(lambda orders: torch.zeros(len(orders), 3), [list(range(20))])


def test_shared_prefix_scores_equal_separate_forward_passes(tiny_llm_dir):
    """Permutation averaging with the prefix's key/value cache reused gives the scores of one
    full forward pass per order (float32 tolerance), for prompts of different lengths."""
    from llamarec.ranking.llm import load_llm
    from llamarec.ranking.prompt import PromptBuilder, encode
    from llamarec.ranking.verbalizer import LetterScorer, common_prefix

    model, tokenizer = load_llm(str(tiny_llm_dir), dtype="float32", device="cpu")
    builder = PromptBuilder(tokenizer)
    letter_ids = resolve_letter_ids(tokenizer, builder.build(["a"], ["b"] * 20))
    scorer = LetterScorer(model, tokenizer, letter_ids, batch_size=3)
    histories = [["Heat"], ["Alien", "Aliens", "The Thing"], ["Up"] * 7, ["Fargo", "Casino"]]
    titles = [f"{letter}ilm {i}" * (1 + i % 3) for i, letter in enumerate("abcdefghijklmnopqrst")]
    orders = seeded_orders(20, 3, seed=5)
    ids = [[builder.build_ids(h, [titles[i] for i in order]) for h in histories] for order in orders]
    shared = scorer.score_shared_prefix(ids)
    separate = scorer.score_ids([seq for version in ids for seq in version]).view(3, len(histories), 20)
    torch.testing.assert_close(shared, separate, atol=1e-4, rtol=1e-4)
    for b, h in enumerate(histories):  # the shared part is the instruction and the history
        prefix = common_prefix([ids[k][b] for k in range(3)])
        assert tokenizer.decode(prefix).endswith(h[-1] + "; \n Candidate pool: (A) ")
        assert ids[0][b] == encode(tokenizer, builder.build(h, [titles[i] for i in orders[0]]))


def test_common_prefix_keeps_one_token_for_every_sequence():
    from llamarec.ranking.verbalizer import common_prefix

    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == [1, 2]
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[7], [7, 8]]) == []
