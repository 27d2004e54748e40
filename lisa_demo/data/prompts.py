"""LISA's question and answer templates, for training and for evaluation.

Short phrases go into "{x}" templates, sentences into "{sentence}" templates. Every training
answer holds exactly one [SEG] token; evaluation uses fixed templates (teacher-forced "[SEG].").
"""

from __future__ import annotations

import random

from lisa_demo.config import SEG_TOKEN

SHORT_QUESTION_TEMPLATES: tuple[str, ...] = (
    "Can you segment the {x} in this image?",
    "Please segment the {x} in this image.",
    "What is {x} in this image? Please respond with segmentation mask.",
    "What is {x} in this image? Please output segmentation mask.",
)
LONG_QUESTION_TEMPLATES: tuple[str, ...] = (
    "{sentence} Please respond with segmentation mask.",
    "{sentence} Please output segmentation mask.",
)
ANSWER_TEMPLATES: tuple[str, ...] = (
    f"It is {SEG_TOKEN}.",
    f"Sure, {SEG_TOKEN}.",
    f"Sure, it is {SEG_TOKEN}.",
    f"Sure, the segmentation result is {SEG_TOKEN}.",
    f"{SEG_TOKEN}.",
)
EVAL_ANSWER = f"{SEG_TOKEN}."


def clean_phrase(query: str) -> str:
    """A short phrase as given, minus surrounding whitespace and one trailing period."""
    phrase = query.strip()
    return phrase[:-1].rstrip() if phrase.endswith(".") else phrase


def _question(query: str, is_sentence: bool, template: str) -> str:
    if is_sentence:
        return template.format(sentence=query.strip())
    return template.format(x=clean_phrase(query))


def training_question(query: str, is_sentence: bool, rng: random.Random) -> str:
    """A randomly chosen LISA question around the query (sentence or short-phrase templates)."""
    templates = LONG_QUESTION_TEMPLATES if is_sentence else SHORT_QUESTION_TEMPLATES
    return _question(query, is_sentence, rng.choice(templates))


def eval_question(query: str, is_sentence: bool) -> str:
    """The fixed evaluation question: the first template of the query's kind."""
    template = LONG_QUESTION_TEMPLATES[0] if is_sentence else SHORT_QUESTION_TEMPLATES[0]
    return _question(query, is_sentence, template)


def training_answer(rng: random.Random, explanation: str | None = None, lead: float = 0.0) -> str:
    """A random LISA answer with exactly one [SEG] and the explanation (if any).

    The explanation follows the [SEG] answer (LISA's layout), or, with probability `lead`,
    comes first and ends in the [SEG]: "It is the small red triangle[SEG]." With no space
    before [SEG] (a space becomes a token of its own), the state that predicts [SEG] is the one
    of the target's last word.

    Raises:
        ValueError: the explanation itself contains [SEG] (it would ask for a second mask).
    """
    answer = rng.choice(ANSWER_TEMPLATES)
    if explanation is None or not explanation.strip():
        return answer
    if SEG_TOKEN in explanation:
        raise ValueError(f"an explanation must not contain {SEG_TOKEN}: {explanation!r}")
    if lead and rng.random() < lead:
        return f"{clean_phrase(explanation)}{SEG_TOKEN}."
    return f"{answer} {explanation.strip()}"
