"""LISA's question/answer templates."""

import random

import pytest

from lisa_demo.config import SEG_TOKEN
from lisa_demo.data.prompts import (
    ANSWER_TEMPLATES,
    EVAL_ANSWER,
    LONG_QUESTION_TEMPLATES,
    SHORT_QUESTION_TEMPLATES,
    eval_question,
    training_answer,
    training_question,
)


def test_every_training_answer_has_exactly_one_seg_token():
    rng = random.Random(0)
    answers = {training_answer(rng) for _ in range(200)}
    assert answers == set(ANSWER_TEMPLATES)
    for explanation in (None, "", "The cup holds hot drinks."):
        for _ in range(50):
            assert training_answer(rng, explanation).count(SEG_TOKEN) == 1


def test_explanation_follows_the_seg_token():
    answer = training_answer(random.Random(3), "  It has a handle. ")
    assert answer.endswith(" It has a handle.")
    assert answer.index(SEG_TOKEN) < answer.index("It has a handle.")
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        training_answer(random.Random(0), f"see {SEG_TOKEN}")


def test_explanation_lead_names_the_target_right_before_the_seg_token():
    rng = random.Random(5)
    answers = [training_answer(rng, "It is the small red star.", lead=0.5) for _ in range(400)]
    lead = [a for a in answers if a == f"It is the small red star{SEG_TOKEN}."]
    # Every other answer is a LISA template followed by the explanation.
    rest = [a for a in answers if a != f"It is the small red star{SEG_TOKEN}."]
    assert all(a.endswith(f"{SEG_TOKEN}. It is the small red star.") for a in rest)
    assert 160 < len(lead) < 240  # about half (binomial, 400 draws)
    always = {training_answer(rng, "It is the cup.", lead=1.0) for _ in range(20)}
    assert always == {f"It is the cup{SEG_TOKEN}."}
    # No explanation: the lead has nothing to put first.
    assert training_answer(random.Random(1), None, lead=1.0) in ANSWER_TEMPLATES


def test_eval_prompt_is_fixed():
    assert EVAL_ANSWER == f"{SEG_TOKEN}."
    assert eval_question(" dog. ", False) == "Can you segment the dog in this image?"
    sentence = "What could I sit on?"
    assert eval_question(sentence, True) == f"{sentence} Please respond with segmentation mask."
    assert eval_question(sentence, True) == eval_question(sentence, True)


def test_training_questions_use_every_template_of_the_kind():
    rng = random.Random(1)
    phrases = {training_question("red ball.", False, rng) for _ in range(100)}
    assert phrases == {t.format(x="red ball") for t in SHORT_QUESTION_TEMPLATES}
    sentences = {training_question(" Which one rolls? ", True, rng) for _ in range(100)}
    assert sentences == {t.format(sentence="Which one rolls?") for t in LONG_QUESTION_TEMPLATES}


def test_training_question_is_deterministic_for_a_seed():
    first = [training_question("cat", False, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
