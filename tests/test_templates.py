"""Prompt templates, chat wrapping and scoring against the official Cola DLM release."""

import json
from pathlib import Path

import pytest

from colabridge.eval import (
    TASKS,
    apply_prompt_template,
    format_choices,
    prompt_from_record,
    score_answer,
    truncate_generation,
    wrap_chat_ids,
)

FIXTURE = Path(__file__).parent / "fixtures" / "cola-official-tiny"


@pytest.fixture(scope="module")
def reference():
    return json.loads((FIXTURE / "reference.json").read_text(encoding="utf-8"))


def _scenario_pairs(reference, name):
    """(prompt record, official fp32 sample) pairs of one reference scenario."""
    scenario = reference["scenarios"][name]
    samples = scenario["results"]["fp32"]["samples"]
    assert len(samples) == len(scenario["prompts"]) > 0
    return scenario, list(zip(scenario["prompts"], samples))


# ---------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------


def test_mmlu_template_matches_official_prompts(reference):
    _, pairs = _scenario_pairs(reference, "template_mmlu")
    for record, sample in pairs:
        assert sample["id"] == record["id"]
        expected = sample["prompt"]
        assert apply_prompt_template("mmlu", question=record["question"], choices=record["choices"]) == expected
        assert prompt_from_record(record, "mmlu") == expected


def test_tasks_are_the_eight_official_benchmarks():
    assert TASKS == ("lambada", "squad", "obqa", "mmlu", "hellaswag", "race", "siqa", "story_cloze")


# Hand-written query tails (everything after the few-shot exemplars) for question "Q?", context "C.",
# choices ["x", "y"].
EXPECTED_TAILS = {
    "lambada": "Q?",
    "squad": "\n\nContext: C.\nQuestion: Q?\nAnswer:",
    "obqa": "\n\nQuestion: Q?\n(A) x\n(B) y\nAnswer:",
    "mmlu": "\n\nQuestion: Q?\n(A) x\n(B) y\nAnswer:",
    "hellaswag": "\n\nContext: Q?\n(A) x\n(B) y\nAnswer:",
    "race": "\n\nArticle: Q?\nOptions:\n(A) x\n(B) y\nAnswer:",
    "siqa": "\n\nQuestion: Q?\n(A) x\n(B) y\nAnswer:",
    "story_cloze": "\n\nStory: Q?\n(A) x\n(B) y\nEnd:",
}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_renders_question_and_query_tail(task):
    prompt = apply_prompt_template(task, question="Q?", context="C.", choices=["x", "y"])
    assert "Q?" in prompt
    assert prompt.endswith(EXPECTED_TAILS[task])


@pytest.mark.parametrize("task", [t for t in TASKS if t != "lambada"])
def test_few_shot_tasks_start_with_an_exemplar(task):
    prompt = apply_prompt_template(task, question="Q?", context="C.", choices=["x", "y"])
    assert len(prompt) > len(EXPECTED_TAILS[task]) + 100
    assert prompt.count("Answer:") + prompt.count("End:") >= 2


def test_lambada_and_unknown_tasks_return_question_verbatim():
    assert apply_prompt_template("lambada", question="the cat sat on the", context="ignored") == "the cat sat on the"
    assert apply_prompt_template("openai", question="Hi!\nHow are you?", choices=["x"]) == "Hi!\nHow are you?"


def test_squad_uses_context_and_multiple_choice_ignores_it():
    assert "Context: The Normans" in apply_prompt_template("squad", question="Q?", context="C.")
    assert "C." not in apply_prompt_template("mmlu", question="Q?", context="C.", choices=["x"])


def test_choice_lines_follow_list_order():
    assert format_choices(["a", "b", "c", "d", "e"]) == "(A) a\n(B) b\n(C) c\n(D) d\n(E) e"
    assert format_choices([]) == ""
    # No choices leaves an empty line where the options go, as in the official template.
    assert apply_prompt_template("mmlu", question="Q?").endswith("\n\nQuestion: Q?\n\nAnswer:")


def test_story_cloze_uses_exactly_two_choices():
    prompt = apply_prompt_template("story_cloze", question="S.", choices=["one", "two"])
    tail = prompt.split("Story: S.\n")[1]
    assert tail == "(A) one\n(B) two\nEnd:"
    assert apply_prompt_template("story_cloze", question="S.").endswith("Story: S.\n(A) \n(B) \nEnd:")
    for bad in (["one"], ["one", "two", "three"]):
        with pytest.raises(ValueError, match="exactly 2 choices"):
            apply_prompt_template("story_cloze", question="S.", choices=bad)


def test_choices_given_as_one_string_are_rejected():
    with pytest.raises(ValueError, match="list of option strings"):
        apply_prompt_template("mmlu", question="Q?", choices="ABCD")


def test_prompt_from_record_reads_fields_and_ignores_answer():
    record = {"question": "Q?", "context": "C.", "choices": ["x", "y"], "answer": "x", "ground_truth": "x"}
    for task in TASKS:
        assert prompt_from_record(record, task) == apply_prompt_template(
            task, question="Q?", context="C.", choices=["x", "y"]
        )
    assert prompt_from_record({}, "lambada") == ""


# ---------------------------------------------------------------------------
# Chat wrapping
# ---------------------------------------------------------------------------


def _chat_ids(call_kwargs):
    return dict(
        im_start_id=call_kwargs["im_start_token_id"],
        user_id=call_kwargs["user_token_id"],
        assistant_id=call_kwargs["assistant_token_id"],
        im_end_id=call_kwargs["im_end_token_id"],
        newline_id=call_kwargs["newline_token_id"],
    )


def test_sft_wrapping_matches_official_ids(reference):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    scenario, pairs = _scenario_pairs(reference, "sft_wrapped")
    chat_ids = _chat_ids(scenario["call_kwargs"])
    assert chat_ids == dict(im_start_id=481, user_id=406, assistant_id=404, im_end_id=482, newline_id=198)
    for record, sample in pairs:
        prompt = prompt_from_record(record, scenario["call_kwargs"]["task_name"])
        assert prompt == sample["prompt"]
        ids = tokenizer.encode(prompt).ids
        assert ids == sample["prompt_ids"]
        n_wrapped = sample["n_prompt_tokens_after_wrapping"]
        assert wrap_chat_ids(ids, **chat_ids) == sample["padded_input_ids"][:n_wrapped]


def test_wrap_chat_ids_layout_and_missing_id():
    ids = dict(im_start_id=1, user_id=2, assistant_id=3, im_end_id=4, newline_id=5)
    assert wrap_chat_ids([7, 8], **ids) == [1, 2, 5, 7, 8, 4, 5, 1, 3, 5]
    assert wrap_chat_ids([], **ids) == [1, 2, 5, 4, 5, 1, 3, 5]
    with pytest.raises(ValueError, match="user_id"):
        wrap_chat_ids([7], **{**ids, "user_id": None})


# ---------------------------------------------------------------------------
# Scoring (scripts/acc_calc.py rules)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (" Paris\nQuestion: next", " Paris"),
        ("\n\n Paris\nmore", "\n\n Paris"),  # leading lines without a word character are kept
        ("?!\n", "?!\n"),  # no word character at all: nothing is cut
        ("no newline", "no newline"),
        ("", ""),
    ],
)
def test_truncate_generation(text, expected):
    assert truncate_generation(text) == expected


@pytest.mark.parametrize(
    "generated, answer, expected",
    [
        (" Paris, France", "paris", True),
        ("Paris!", "Paris.", True),
        (" the Paris", "Paris", False),
        ("\n dog\ncat", "dog", True),  # cut first, then the first word
        ("", "", True),
        ("cat", "dog", False),
    ],
)
def test_score_lambada_first_word(generated, answer, expected):
    assert score_answer("lambada", generated, answer) is expected


MMLU_CHOICES = ["dog", "bird", "fish", "horse"]


@pytest.mark.parametrize("task", ["mmlu", "obqa", "race", "siqa"])
@pytest.mark.parametrize(
    "generated, answer, expected",
    [
        (" B", "bird", True),  # bare letter vs answer given as option text
        ("(b).", "B", True),
        (" The answer is (B)", "bird", True),
        ("Option: B, since birds fly", "bird", True),
        (" bird\nQuestion: next one", "bird", True),  # option text, after the newline cut
        ("The correct answer is Bird!", "bird", True),
        ("a small bird", "bird", True),  # exactly one option contained in the text
        ("birds", "bird", True),  # "bird" is the only option contained in "birds"
        ("horsse", "D", True),  # fuzzy option-text match (difflib ratio 0.91 >= 0.9)
        ("hors", "D", False),  # ratio 0.89: too far from "horse"
        (" E", "bird", False),  # letter outside the option range
        (" 3", "4", False),  # official mmlu record: no letter, no option text
        (" A", "bird", False),
        ("dog or bird", "bird", False),  # two options contained: no letter, texts differ
    ],
)
def test_score_multiple_choice_letter_or_text(task, generated, answer, expected):
    assert score_answer(task, generated, answer, MMLU_CHOICES) is expected


def test_score_multiple_choice_falls_back_to_exact_text_without_choices():
    assert score_answer("mmlu", "Bird.", "bird") is True
    assert score_answer("mmlu", "B", "bird") is False


def test_score_official_mmlu_records():
    choices = ["0", "4", "2", "6"]  # from the official eval_output/tasks_default/mmlu_wrong.jsonl
    assert score_answer("mmlu", " 2\nQuestion: The given triangle", "4", choices) is False
    assert score_answer("mmlu", " 4\nQuestion: next", "4", choices) is True


@pytest.mark.parametrize("task", ["squad", "hellaswag", "story_cloze", "openai"])
@pytest.mark.parametrize(
    "generated, answer, expected",
    [
        (" France.\nContext: more", "france", True),
        ("  He won   the gold medal!", "He won the gold medal.", True),
        (" France and Belgium", "France", False),
        ("Franc", "France", False),  # near misses fail: the threshold is a ratio of 1.0
        (" B", "starts to toast", False),  # no letter extraction outside mmlu/obqa/race/siqa
    ],
)
def test_score_free_text_needs_identical_normalised_text(task, generated, answer, expected):
    assert score_answer(task, generated, answer, ["starts to toast", "x"]) is expected


def test_score_rejects_choices_given_as_one_string():
    with pytest.raises(ValueError, match="list of option strings"):
        score_answer("mmlu", "B", "bird", "ABCD")
