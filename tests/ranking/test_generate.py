import pytest
import torch

from llamarec.errors import LlamarecError
from llamarec.metrics import target_ranks
from llamarec.ranking.examples import RankExample
from llamarec.ranking.generate import (
    GENERATION_INSTRUCTION,
    GenerationRanker,
    matched_candidates,
    max_new_tokens,
    parse_ranking,
    ranking_scores,
)
from llamarec.ranking.prompt import LETTERS, PromptConfig, encode

TITLES = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Se7en (1995)"]


def test_exact_titles_in_order_then_the_unnamed_ones():
    assert parse_ranking("Casino (1995)\nToy Story (1995)", TITLES) == [2, 0, 1, 3]


def test_case_and_whitespace_do_not_matter():
    assert parse_ranking("  heat   (1995) \nSE7EN (1995)", TITLES) == [1, 3, 0, 2]


def test_fuzzy_match_above_the_threshold_only():
    assert matched_candidates("Toy Story (1996)", TITLES) == [0]
    assert matched_candidates("Casino Royale (2006)", TITLES) == []
    assert matched_candidates("Casino Royale (2006)", TITLES, threshold=0.5) == [2]


def test_list_markers_are_dropped():
    assert matched_candidates("1. Heat (1995)\n2) Casino (1995)\n- Se7en (1995)\n* Toy Story (1995)",
                              TITLES) == [1, 2, 3, 0]


def test_letters_alone_with_titles_and_on_one_line():
    assert matched_candidates("(C)\n(a) Toy Story (1995)", TITLES) == [2, 0]
    assert matched_candidates("(D) Se7en (1995) (B) Heat (1995)", TITLES) == [3, 1]


def test_a_matching_title_wins_over_its_letter_and_the_letter_is_the_fallback():
    assert matched_candidates("(A) Heat (1995)", TITLES) == [1]
    assert matched_candidates("(A) something else", TITLES) == [0]


def test_letters_outside_the_pool_are_ignored():
    assert matched_candidates("(T)\n(E) nothing", TITLES) == []
    assert LETTERS.index("T") >= len(TITLES)


def test_each_candidate_at_most_once():
    text = "Heat (1995)\nheat (1995)\n(B)\nHeat (1996)\nCasino (1995)"
    assert matched_candidates(text, TITLES) == [1, 2]


def test_equal_titles_go_to_distinct_candidates():
    titles = ["Hamlet (1990)", "Hamlet (1990)", "Heat (1995)"]
    assert parse_ranking("Hamlet (1990)\nHamlet (1990)\nHamlet (1990)", titles) == [0, 1, 2]


@pytest.mark.parametrize("text", ["", "\n\n", "lorem ipsum dolor", "### Response:\n(Z) 42"])
def test_garbage_keeps_the_original_order(text):
    assert parse_ranking(text, TITLES) == [0, 1, 2, 3]


def test_scores_rank_the_target_at_its_position():
    ranking = [2, 0, 3, 1]
    scores = ranking_scores(ranking)
    assert scores.tolist() == [3.0, 1.0, 4.0, 2.0]
    ranks = target_ranks(scores.expand(4, 4), torch.tensor(ranking))
    assert ranks.tolist() == [0, 1, 2, 3]


def test_max_new_tokens_counts_titles_and_separators(char_tokenizer):
    assert max_new_tokens(char_tokenizer, ["abc", "de"]) == 3 + 2 + 2
    assert max_new_tokens(char_tokenizer, ["abc", "de"], separator=" \n ") == 5 + 2 * 3


def char_titles(n_items=30):
    return ["<pad>"] + [f"Movie {i} ({1950 + i})" for i in range(1, n_items + 1)]


def char_examples(n_examples=3, n_candidates=20):
    return [RankExample(user=u, history=tuple(range(1 + u, 4 + 2 * u)),
                        candidates=tuple(range(5 + u, 5 + u + n_candidates)), target=u)
            for u in range(n_examples)]


class ScriptedModel(torch.nn.Module):
    """Generates a fixed answer, then end-of-sequence tokens, after every prompt."""

    def __init__(self, answer_ids, eos_id):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = type("Config", (), {"eos_token_id": eos_id})()
        self.answer_ids, self.eos_id = answer_ids, eos_id
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append({"input_ids": input_ids, "max_new_tokens": max_new_tokens, **kwargs})
        new = (self.answer_ids + [self.eos_id] * max_new_tokens)[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new] * len(input_ids))], dim=1)


def test_scripted_answer_is_cut_at_eos_and_parsed(char_tokenizer):
    titles = char_titles()
    answer = "(C) Movie 7 (1957)\nMovie 5 (1955)\n"
    model = ScriptedModel(encode(char_tokenizer, answer), char_tokenizer.eos_token_id)
    model.train()
    ranker = GenerationRanker(model, char_tokenizer, titles)
    [result] = ranker.generate(char_examples(1))
    assert result.text == answer
    assert result.n_tokens == len(answer) + 1
    assert result.ranking[:3] == [2, 0, 1] and sorted(result.ranking) == list(range(20))
    assert result.n_matched == 2
    call = model.calls[0]
    assert call["do_sample"] is False
    assert call["max_new_tokens"] == max_new_tokens(char_tokenizer, ranker.shown_titles(char_examples(1)[0]))
    assert GENERATION_INSTRUCTION in char_tokenizer.decode(call["input_ids"][0])
    assert model.training


def test_a_given_prompt_config_is_used_as_is(char_tokenizer):
    ranker = GenerationRanker(ScriptedModel([], 2), char_tokenizer, char_titles(),
                              PromptConfig(instruction="List them."))
    assert "List them." in ranker.prompt(char_examples(1)[0])


def test_tiny_model_gives_a_permutation_per_example(char_tokenizer, make_tiny_llama):
    model = make_tiny_llama(len(char_tokenizer))
    titles = ["<pad>"] + [f"T{i}" for i in range(1, 31)]  # short titles: a short token budget
    examples = char_examples(2)
    ranker = GenerationRanker(model, char_tokenizer, titles)
    results = ranker.generate(examples)
    for result, example in zip(results, examples, strict=True):
        assert sorted(result.ranking) == list(range(20))
        assert 0 < result.n_tokens <= max_new_tokens(char_tokenizer, ranker.shown_titles(example))
    batched = GenerationRanker(model, char_tokenizer, titles, batch_size=2).generate(examples)
    assert [r.text for r in batched] == [r.text for r in results]


def test_rank_stacks_the_scores_and_texts(char_tokenizer):
    answer = "Movie 9 (1959)\n"
    model = ScriptedModel(encode(char_tokenizer, answer), char_tokenizer.eos_token_id)
    scores, texts = GenerationRanker(model, char_tokenizer, char_titles()).rank(char_examples(2))
    assert texts == [answer, answer]
    assert scores.shape == (2, 20)
    assert scores[0].argmax() == 4 and scores[1].argmax() == 3  # where item 9 is in each pool


def test_examples_with_different_pool_sizes_raise(char_tokenizer):
    ranker = GenerationRanker(ScriptedModel([], 2), char_tokenizer, char_titles())
    examples = [char_examples(1, 20)[0], char_examples(1, 5)[0]]
    with pytest.raises(LlamarecError, match="same number of candidates"):
        ranker.generate(examples)


def test_no_examples_give_an_empty_result(char_tokenizer):
    scores, texts = GenerationRanker(ScriptedModel([], 2), char_tokenizer, char_titles()).rank([])
    assert scores.shape == (0, 20) and texts == []
