"""Answer-quality metrics, written out so their exact definitions are visible (SQuAD-style normalisation)."""

import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace: 'The Saturn V.' == 'saturn v'."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1: the harmonic mean of precision and recall of the normalised words both share (with counts)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised word tokens."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = longest_common_subsequence(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def label_words(text: str) -> str:
    """A label's words: `earth_science`, `Earth science.` and `earth-science` are all 'earth science'
    (normalize_answer alone would strip the underscore and glue the words together)."""
    return normalize_answer(re.sub(r"[_-]", " ", text))


def predicted_label(prediction: str, labels: list[str] | None) -> str:
    """The label a generation names: the longest known label its words start with, whole words only
    ('planetary science' names planetary, 'planetarium' does not); else the generation's words."""
    words = label_words(prediction)
    for label in sorted(labels or [], key=lambda label: len(label_words(label)), reverse=True):
        target = label_words(label)
        if words == target or words.startswith(target + " "):
            return label
    return words


def accuracy(prediction: str, reference: str, labels: list[str] | None = None) -> float:
    return float(label_words(predicted_label(prediction, labels)) == label_words(reference))


def score(metric: str, predictions: list[str], references: list[str], labels: list[str] | None = None) -> float:
    """Mean of a per-example metric over the predictions."""
    if not predictions:
        return float("nan")
    per_example = {
        "exact_match": exact_match,
        "f1": token_f1,
        "rouge_l": rouge_l,
        "accuracy": lambda p, r: accuracy(p, r, labels),
    }[metric]
    return sum(per_example(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)
