"""Answer metrics as SQuAD defines them (normalised exact match, token F1)."""

import pytest

from lmdiff_ft.evaluation.metrics import exact_match, score, token_f1


@pytest.mark.parametrize(
    "prediction, reference, f1",
    [
        ("The Saturn V.", "saturn v", 1.0),
        ("in September 2007", "September 2007", 0.8),  # precision 2/3, recall 1
        ("Gale Crater", "Jezero Crater", 0.5),
        ("", "Mars", 0.0),
        ("the the", "the", 1.0),  # articles are dropped before counting: both are empty
        ("Mars Mars", "Mars", 2 / 3),  # counts matter: precision 1/2
    ],
)
def test_token_f1(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_exact_match_and_f1_through_score():
    predictions, references = ["1969", "July 1969"], ["1969", "1969"]
    assert score("exact_match", predictions, references) == 0.5 == sum(map(exact_match, predictions, references)) / 2
    assert score("f1", predictions, references) == pytest.approx((1 + 2 / 3) / 2)
