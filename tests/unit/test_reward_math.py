"""Answer extraction and scoring of the GSM8K-style rule reward."""

import pytest

from spmd_rlhf.rewards.math import compute_score, extract_answer, parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is 12.\n#### 1,234", 1234.0),
        ("#### 5 ... later #### 7", 7.0),
        ("The answer is \\boxed{42}.", 42.0),
        ("nested \\boxed{{7}} here", 7.0),
        ("first 3 apples then 10 pears, 15 in all.", 15.0),
        ("she lost -4 points", -4.0),
        ("it costs $18.", 18.0),
        ("price 3.50", 3.5),
        ("a 25% rise", 25.0),
        ("#### -1,000.5", -1000.5),
    ],
)
def test_extract_answer_numbers(text: str, expected: float) -> None:
    answer = extract_answer(text)
    assert answer is not None
    assert parse_number(answer) == pytest.approx(expected)


def test_priority_strict_over_boxed_over_last_number() -> None:
    assert parse_number(extract_answer("\\boxed{3} 9\n#### 5")) == 5.0
    assert parse_number(extract_answer("\\boxed{3} then 9")) == 3.0


def test_extract_answer_none_without_numbers() -> None:
    assert extract_answer("I do not know.") is None


def test_parse_number_forms() -> None:
    assert parse_number("3/4") == 0.75
    assert parse_number("$1,234.") == 1234.0
    assert parse_number("3.50") == parse_number("3.5")
    assert parse_number("1/0") is None
    assert parse_number("abc") is None
    assert parse_number("nan") is None


def test_compute_score_correct_and_wrong() -> None:
    assert compute_score("work...\n#### 72", "72") == 1.0
    assert compute_score("The answer is $3.50.", "3.5") == 1.0
    assert compute_score("\\boxed{1,234}", "1234") == 1.0
    assert compute_score("#### 71", "72") == 0.0
    assert compute_score("no idea", "72") == 0.0


def test_compute_score_string_fallback() -> None:
    assert compute_score("\\boxed{yes}", "yes") == 1.0
    assert compute_score("\\boxed{no}", "yes") == 0.0
