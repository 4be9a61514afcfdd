"""What a user of the app can set, and what one request may cost: light, so that the command line takes its
defaults from here without loading the app."""

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationSettings:
    """Shared by every column, so that columns differ only by their weights."""

    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    greedy: bool = True


@dataclass(frozen=True)
class Limits:
    """What one request may cost: two users must not run a CPU machine out of memory or time."""

    max_prompt_chars: int = 4000
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256


DEFAULT_LIMITS = Limits()
QUEUE_SIZE = 16  # requests waiting beyond this are turned away ("queue full") instead of piling up
