"""Answer metrics as SQuAD defines them (normalised exact match, token F1)."""

import pytest

from lmdiff_ft.evaluation.metrics import accuracy, exact_match, predicted_label, score, token_f1


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


MISSION_LABELS = ["planetary", "astrophysics", "heliophysics", "earth_science", "human_spaceflight"]


@pytest.mark.parametrize(
    "prediction, label",
    [
        ("earth_science", "earth_science"),
        ("Earth science.", "earth_science"),  # the label's words, however written
        ("earth-science mission", "earth_science"),
        ("human_spaceflight\nMission: Apollo", "human_spaceflight"),  # a generation that runs on
        ("planetary science", "planetary"),
        ("earth_sciences", "earth sciences"),  # whole words: not a label
        ("planetarium", "planetarium"),
        ("", ""),
    ],
)
def test_predicted_label_reads_labels_with_underscores_as_words(prediction, label):
    assert predicted_label(prediction, MISSION_LABELS) == label


def test_the_longest_label_a_generation_starts_with_wins():
    assert predicted_label("crew rotation flight", ["crew", "crew_rotation"]) == "crew_rotation"
    assert predicted_label("crew change", ["crew", "crew_rotation"]) == "crew"


def test_accuracy_with_labels_that_contain_underscores():
    predictions = ["earth_science", "Human spaceflight.", "earthscience", "planetary"]
    references = ["earth_science", "human_spaceflight", "earth_science", "heliophysics"]
    assert [accuracy(p, r, MISSION_LABELS) for p, r in zip(predictions, references, strict=True)] == [1, 1, 0, 0]
    assert score("accuracy", predictions, references, MISSION_LABELS) == 0.5
    assert score("accuracy", ["earth science"], ["earth_science"]) == 1.0  # without labels: the words compared
