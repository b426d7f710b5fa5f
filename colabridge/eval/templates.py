"""Benchmark prompt templates, chat wrapping and answer scoring of the official Cola DLM release.

Reproduces, string for string, the prompts built by the official
``cola_dlm/inference.py::apply_prompt_template`` (ByteDance-Seed/Cola-DLM @ 6752ff1, spec §5.2),
its SFT chat wrapping of prompt ids, and the scoring rules of ``scripts/acc_calc.py`` (spec §5.6).

The few-shot exemplars below are data copied verbatim from the official release: changing a single
character changes the tokenised prompt and therefore every benchmark number.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Callable, Mapping, Optional, Sequence

__all__ = [
    "TASKS",
    "apply_prompt_template",
    "format_choices",
    "prompt_from_record",
    "score_answer",
    "truncate_generation",
    "wrap_chat_ids",
]

# ---------------------------------------------------------------------------
# Few-shot exemplars (official data, verbatim). Each block ends with the blank line that separates
# it from the query.
# ---------------------------------------------------------------------------

_SQUAD_EXEMPLAR = (
    "Context: The Normans (Norman: Nourmands; French: Normands; Latin: Normanni) were the people who "
    "in the 10th and 11th centuries gave their name to Normandy, a region in France. They were "
    "descended from Norse raiders and pirates from Denmark, Iceland and Norway.\n"
    "Question: In what country is Normandy located?\n"
    "Answer: France\n\n"
)

_OBQA_EXEMPLARS = (
    "Question: Which tool is best for tightening a screw?\n"
    "(A) spoon\n"
    "(B) hammer\n"
    "(C) screwdriver\n"
    "(D) paintbrush\n"
    "Answer: screwdriver\n\n"
    "Question: What do plants absorb from the air during photosynthesis?\n"
    "(A) carbon dioxide\n"
    "(B) oxygen\n"
    "(C) helium\n"
    "(D) salt\n"
    "Answer: carbon dioxide\n\n"
)

_HELLASWAG_EXEMPLARS = (
    "Context: The girl puts the bread into the toaster and pushes the lever down. The bread\n"
    "(A) becomes a slice of pizza.\n"
    "(B) starts to toast and turn brown.\n"
    "(C) disappears immediately.\n"
    "(D) turns into a glass of water.\n"
    "Answer: starts to toast and turn brown.\n\n"
    "Context: The goalkeeper sees the ball coming towards the net. He dives and\n"
    "(A) catches the ball with his hands.\n"
    "(B) starts dancing in the field.\n"
    "(C) opens a laptop to check email.\n"
    "(D) runs away from the stadium.\n"
    "Answer: catches the ball with his hands.\n\n"
)

_MMLU_EXEMPLARS = (
    "Question: Which gas do plants absorb from the air during photosynthesis?\n"
    "(A) Oxygen\n"
    "(B) Carbon dioxide\n"
    "(C) Nitrogen\n"
    "(D) Hydrogen\n"
    "Answer: Carbon dioxide\n\n"
    "Question: A triangle has angles 50 degrees and 60 degrees. What is the third angle?\n"
    "(A) 60 degrees\n"
    "(B) 70 degrees\n"
    "(C) 80 degrees\n"
    "(D) 90 degrees\n"
    "Answer: 70 degrees\n\n"
)

_RACE_EXEMPLARS = (
    "Read the following article and answer the question.\n\n"
    "Article: Mary went to the store to buy some fruits. She bought five apples and two oranges. "
    "She paid 5 dollars in total. What did Mary buy?\n"
    "Options:\n"
    "(A) Bananas\n"
    "(B) Apples and oranges\n"
    "(C) Grapes\n"
    "(D) Watermelon\n"
    "Answer: Apples and oranges\n\n"
)

_SIQA_EXEMPLARS = (
    "Question: Jordan wanted to tell a joke to his friends. What does Jordan need to do before this?\n"
    "(A) ignore his friends\n"
    "(B) think of a funny story\n"
    "(C) leave the room\n"
    "Answer: think of a funny story\n\n"
    "Question: Kai helped his neighbor carry heavy groceries inside. How would the neighbor feel?\n"
    "(A) angry\n"
    "(B) grateful\n"
    "(C) scared\n"
    "Answer: grateful\n\n"
)

_STORY_CLOZE_EXEMPLARS = (
    "Story: I wanted to make an omelet. I cracked two eggs into a bowl and whisked them. "
    "Then I poured them into a hot pan.\n"
    "(A) I ate a delicious omelet for breakfast.\n"
    "(B) I decided to order a pizza instead.\n"
    "End: I ate a delicious omelet for breakfast.\n\n"
    "Story: The runner tied his shoes tight. He sprinted as fast as he could during the race. "
    "He crossed the finish line first.\n"
    "(A) He was sad that he lost the race.\n"
    "(B) He won the gold medal.\n"
    "End: He won the gold medal.\n\n"
)

# Story Cloze offers two candidate endings; the official template renders exactly (A) and (B).
_STORY_CLOZE_N_CHOICES = 2

# ---------------------------------------------------------------------------
# Prompt builders. All share the signature (question, context, choices) -> prompt.
# ---------------------------------------------------------------------------

PromptBuilder = Callable[[str, str, Sequence[str]], str]


def format_choices(choices: Sequence[str]) -> str:
    """Render choices as ``"(A) first\\n(B) second\\n..."``; letters follow list order."""
    return "\n".join(f"({chr(ord('A') + i)}) {choice}" for i, choice in enumerate(choices))


def _verbatim(question: str, context: str, choices: Sequence[str]) -> str:
    """lambada (and any unknown task): the question is the whole prompt; context/choices unused."""
    return question


def _squad(question: str, context: str, choices: Sequence[str]) -> str:
    """One extractive-QA exemplar, then the context/question query (choices unused)."""
    return f"{_SQUAD_EXEMPLAR}Context: {context}\nQuestion: {question}\nAnswer:"


def _multiple_choice(
    exemplars: str, label: str, options_header: str, question: str, context: str, choices: Sequence[str]
) -> str:
    """Exemplars, then ``{label}: {question}``, optional header line, choice lines, ``Answer:``.

    ``context`` is unused: the official multiple-choice templates put everything in ``question``.
    """
    return f"{exemplars}{label}: {question}\n{options_header}{format_choices(choices)}\nAnswer:"


def _story_cloze(question: str, context: str, choices: Sequence[str]) -> str:
    """Two story exemplars, then the story and its two candidate endings, ending in ``End:``.

    With no choices both endings render empty, as in the official template.
    """
    if not choices:
        choices = [""] * _STORY_CLOZE_N_CHOICES
    if len(choices) != _STORY_CLOZE_N_CHOICES:
        # The official code raises IndexError for one choice and silently drops a third or later one.
        raise ValueError(
            f"story_cloze takes exactly {_STORY_CLOZE_N_CHOICES} choices (the two candidate endings), "
            f"got {len(choices)}: {list(choices)!r}. Pass both endings, or none."
        )
    return f"{_STORY_CLOZE_EXEMPLARS}Story: {question}\n{format_choices(choices)}\nEnd:"


_BUILDERS: dict[str, PromptBuilder] = {
    "lambada": _verbatim,
    "squad": _squad,
    "obqa": functools.partial(_multiple_choice, _OBQA_EXEMPLARS, "Question", ""),
    "mmlu": functools.partial(_multiple_choice, _MMLU_EXEMPLARS, "Question", ""),
    "hellaswag": functools.partial(_multiple_choice, _HELLASWAG_EXEMPLARS, "Context", ""),
    "race": functools.partial(_multiple_choice, _RACE_EXEMPLARS, "Article", "Options:\n"),
    "siqa": functools.partial(_multiple_choice, _SIQA_EXEMPLARS, "Question", ""),
    "story_cloze": _story_cloze,
}

TASKS: tuple[str, ...] = tuple(_BUILDERS)
"""The eight benchmark tasks of the official evaluation, in the official order."""


def apply_prompt_template(
    task: str, question: str = "", context: str = "", choices: Optional[Sequence[str]] = None
) -> str:
    """Build the prompt string the official release feeds to the tokenizer for ``task``.

    Args:
        task: one of :data:`TASKS`. Any other name (e.g. the OpenAI adapter's ``"openai"``) returns
            ``question`` verbatim, exactly like the official code, so free-form prompts pass through.
        question: the question, passage (race), sentence start (hellaswag) or story (story_cloze).
        context: the supporting paragraph; only ``squad`` uses it.
        choices: answer options, rendered ``(A) ...`` one per line; ``None`` means no options.
            ``story_cloze`` needs exactly two (or none).

    Returns:
        The prompt text, ending in ``"Answer:"`` (``"End:"`` for story_cloze) for templated tasks.
    """
    if isinstance(choices, str):
        raise ValueError(f"choices must be a list of option strings, got the single string {choices!r}.")
    builder = _BUILDERS.get(task, _verbatim)
    return builder(question, context, list(choices or []))


def prompt_from_record(record: Mapping[str, object], task: str) -> str:
    """Prompt for one benchmark JSONL record with fields ``question``, ``context``, ``choices``.

    Missing fields default like the official reader (``""``, ``""``, ``None``). The record's
    ``answer`` / ``ground_truth`` is not part of the prompt.
    """
    return apply_prompt_template(
        task,
        question=record.get("question", ""),
        context=record.get("context", ""),
        choices=record.get("choices"),
    )


def wrap_chat_ids(
    ids: Sequence[int], *, im_start_id: int, user_id: int, assistant_id: int, im_end_id: int, newline_id: int
) -> list[int]:
    """Wrap prompt token ids in the SFT chat layout (spec §5.2).

    Layout: ``[im_start, user, \\n] + ids + [im_end, \\n, im_start, assistant, \\n]``, i.e. one user turn
    followed by an open assistant turn. The official code wraps only when ``is_sft`` is set and all
    five ids are known; here every id is required.
    """
    special = {
        "im_start_id": im_start_id,
        "user_id": user_id,
        "assistant_id": assistant_id,
        "im_end_id": im_end_id,
        "newline_id": newline_id,
    }
    missing = [name for name, value in special.items() if value is None]
    if missing:
        raise ValueError(
            f"wrap_chat_ids needs every chat token id; got None for {missing}. Take them from the tokenizer."
        )
    user_open = [im_start_id, user_id, newline_id]
    assistant_open = [im_end_id, newline_id, im_start_id, assistant_id, newline_id]
    return user_open + list(ids) + assistant_open


# ---------------------------------------------------------------------------
# Scoring (scripts/acc_calc.py rules). Every task passes only at similarity >= 1.0.
# ---------------------------------------------------------------------------

_PASS_THRESHOLD = 1.0
_TEXT_MATCH_MIN_RATIO = 0.9  # a fuzzy choice-text match needs this difflib ratio
_BRACKET_SEARCH_MAX_LEN = 40  # "(B)" anywhere counts only in short answers
_MAX_LETTERS = 26

_WORD_CHAR = re.compile(r"\w")
_PUNCTUATION = re.compile(r"[^\w\s]")
_SEP = r"(?:is|=|:|：)?"  # "answer is B", "answer = B", "answer: B", full-width colon
_BARE_LETTER = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\.?")  # whole answer: "B", "(b)", "[C].", ...
_KEYWORD_LETTER = re.compile(
    rf"(?i)\b(?:final\s+answer|answer|option|choice)\b\s*{_SEP}\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?=\s|$|[.,;:!?])"
)
_BRACKET_LETTER = re.compile(r"[\(\[]\s*([A-Za-z])\s*[\)\]]")
_ANSWER_LINE = re.compile(rf"(?i)\b(?:final\s+answer|answer)\b\s*{_SEP}\s*(.+)$")
_ANSWER_PREAMBLE = re.compile(rf"(?i)^(the\s+)?(correct\s+)?(final\s+)?(answer|option|choice)\b\s*{_SEP}\s*")


def truncate_generation(text: str) -> str:
    """Cut generated text at the first newline that has a word character somewhere before it.

    Leading blank or punctuation-only lines are kept, so ``"\\n Paris\\nmore"`` becomes ``"\\n Paris"``.
    """
    first_word_char = _WORD_CHAR.search(text)
    if first_word_char is None:
        return text
    cut = text.find("\n", first_word_char.start())
    return text if cut == -1 else text[:cut]


def _normalise(text: object) -> str:
    """Lower-case, drop punctuation (keep word chars and spaces), collapse whitespace."""
    if text is None:
        return ""
    text = _PUNCTUATION.sub("", str(text).lower().strip())
    return " ".join(text.split())


def _similarity(a: object, b: object) -> float:
    """difflib ratio of the normalised texts; two empty texts count as identical."""
    norm_a, norm_b = _normalise(a), _normalise(b)
    if not norm_a and not norm_b:
        return 1.0
    return difflib.SequenceMatcher(None, norm_a, norm_b).ratio()


def _letter(index_or_letter: object, n_choices: int) -> str:
    """Upper-case choice letter if it names one of the first ``n_choices`` options, else ``""``."""
    letter = str(index_or_letter).upper()
    return letter if 0 <= ord(letter) - ord("A") < n_choices else ""


def _explicit_letter(text: object, n_choices: int) -> str:
    """Choice letter written out: a bare letter, ``answer/option/choice <letter>``, or ``(X)``."""
    raw = "" if text is None else str(text).strip()
    if not raw:
        return ""
    bare = _BARE_LETTER.fullmatch(raw)
    if bare and _letter(bare.group(1), n_choices):
        return _letter(bare.group(1), n_choices)
    keyword = _KEYWORD_LETTER.findall(raw)
    if keyword and _letter(keyword[-1], n_choices):
        return _letter(keyword[-1], n_choices)
    if len(raw) <= _BRACKET_SEARCH_MAX_LEN:
        bracket = _BRACKET_LETTER.findall(raw)
        if bracket:
            return _letter(bracket[-1], n_choices)
    return ""


def _letter_by_text(text: object, choices: Sequence[str]) -> str:
    """Choice letter whose option text the answer states: exactly, by containment, or fuzzily."""
    if text is None or not choices or not _normalise(text):
        return ""
    norm_choices = [_normalise(choice) for choice in choices]
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if _normalise(text) in norm_choices:
        return letters[norm_choices.index(_normalise(text))]
    cleaned = _ANSWER_PREAMBLE.sub("", str(text), count=1).strip()  # "The answer is X" -> "X"
    norm_cleaned = _normalise(cleaned)
    if not norm_cleaned:
        return ""
    if norm_cleaned in norm_choices:
        return letters[norm_choices.index(norm_cleaned)]
    contained = [i for i, choice in enumerate(norm_choices) if choice and choice in norm_cleaned]
    if len(contained) == 1:
        return letters[contained[0]]
    scores = [_similarity(cleaned, choice) for choice in choices]
    best = max(range(len(scores)), key=scores.__getitem__)  # first of equal scores wins
    return letters[best] if scores[best] >= _TEXT_MATCH_MIN_RATIO else ""


def _answer_segment(text: str) -> str:
    """Text after the last ``answer:`` / ``final answer is`` marker, else the whole stripped text."""
    raw = str(text).strip()
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    for line in reversed(lines):
        marker = _ANSWER_LINE.search(line)
        if marker and marker.group(1).strip():
            return marker.group(1).strip()
    return raw


def _predicted_letter(generated: str, choices: Sequence[str]) -> str:
    """Choice letter the generation commits to, looking at its answer segment first."""
    n_choices = min(len(choices), _MAX_LETTERS)
    if n_choices == 0:
        return ""
    for candidate in (_answer_segment(generated), generated):
        letter = _explicit_letter(candidate, n_choices) or _letter_by_text(candidate, choices)
        if letter:
            return letter
    return ""


def _reference_letter(answer: str, choices: Sequence[str]) -> str:
    """Choice letter of the reference answer (given as a letter or as the option text)."""
    n_choices = min(len(choices), _MAX_LETTERS)
    if n_choices == 0:
        return ""
    return _explicit_letter(answer, n_choices) or _letter_by_text(answer, choices)


def _first_word(text: object) -> str:
    """First word of the normalised text, ``""`` if there is none."""
    words = _normalise(text).split()
    return words[0] if words else ""


def _first_word_equal(generated: str, answer: str, choices: Sequence[str]) -> bool:
    """lambada: the first normalised word of the generation equals that of the answer."""
    return _first_word(generated) == _first_word(answer)


def _same_choice(generated: str, answer: str, choices: Sequence[str]) -> bool:
    """Multiple choice: same extracted choice letter, or else the normalised texts are identical."""
    predicted = _predicted_letter(generated, choices)
    if predicted and predicted == _reference_letter(answer, choices):
        return True
    return _similarity(generated, answer) >= _PASS_THRESHOLD


def _same_text(generated: str, answer: str, choices: Sequence[str]) -> bool:
    """Free text: normalised difflib ratio reaches the threshold, i.e. the normalised texts match."""
    return _similarity(generated, answer) >= _PASS_THRESHOLD


_SCORERS: dict[str, Callable[[str, str, Sequence[str]], bool]] = {
    "lambada": _first_word_equal,
    "mmlu": _same_choice,
    "obqa": _same_choice,
    "race": _same_choice,
    "siqa": _same_choice,
}


def score_answer(task: str, generated: str, answer: str, choices: Optional[Sequence[str]] = None) -> bool:
    """Whether ``generated`` counts as correct for ``answer`` under the official ``acc_calc.py`` rules.

    The generation is first cut by :func:`truncate_generation`. Then:

    - ``lambada``: first normalised word must equal the answer's;
    - ``mmlu``, ``obqa``, ``race``, ``siqa``: the choice letter extracted from the generation (a
      letter such as ``"(B)"`` / ``"Answer: B"``, or the text of an option) must equal the answer's,
      otherwise the normalised texts must be identical;
    - ``squad``, ``hellaswag``, ``story_cloze`` and any other task: the normalised texts (lower case,
      no punctuation, single spaces) must be identical (difflib ratio >= 1.0). The official scorer does
      not extract letters for hellaswag or story_cloze, so a bare ``"B"`` is wrong there.

    ``choices`` only matters for the multiple-choice tasks; ``None`` means no options.
    """
    if isinstance(choices, str):
        raise ValueError(f"choices must be a list of option strings, got the single string {choices!r}.")
    scorer = _SCORERS.get(task, _same_text)
    return scorer(truncate_generation(generated), answer, list(choices or []))
