"""A few hundred varied English sentences for the real-weight precision study (no dataset download).

Built from templates over hand-written word lists, deterministic: captions, questions, instructions,
numbers, long and short sentences, punctuation, a few rare words, so that token statistics vary.
"""

from __future__ import annotations

import itertools
import random

SUBJECTS = [
    "a small dog",
    "two children",
    "an old man",
    "the red car",
    "a flock of birds",
    "my neighbour's cat",
    "a tired cyclist",
    "the orchestra",
    "three students",
    "a wooden boat",
    "the city council",
    "a golden retriever",
    "an astronaut",
    "the baker",
    "a group of tourists",
    "the night train",
]
VERBS = [
    "is running across",
    "waits beside",
    "looks at",
    "sleeps under",
    "drives through",
    "is painting",
    "quietly crosses",
    "climbs over",
    "photographs",
    "is repairing",
    "stands in front of",
    "walks along",
]
OBJECTS = [
    "a snowy field",
    "the crowded market",
    "a bright yellow door",
    "the harbour at sunset",
    "an empty parking lot",
    "a pile of autumn leaves",
    "the museum entrance",
    "a muddy football pitch",
    "the kitchen table",
    "a narrow mountain road",
    "the glass skyscraper",
    "a field of sunflowers",
]
QUESTIONS = [
    "What colour is the {}?",
    "How many {} are in the picture?",
    "Is there a {} next to the window?",
    "Where is the {} standing?",
    "Why is the {} wet?",
    "Who owns the {}?",
]
NOUNS = [
    "umbrella",
    "bicycle",
    "teapot",
    "lighthouse",
    "giraffe",
    "violin",
    "backpack",
    "tractor",
    "kite",
    "laptop",
]
OTHER = [
    "The quarterly revenue rose by 12.5% compared with 2023.",
    "Please restart the router, then wait thirty seconds before reconnecting.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Ich habe keine Ahnung, wo der Bahnhof ist.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Error 404: the requested page could not be found on this server.",
    "She said, \"I'll be there at 7:45 p.m., don't wait for me.\"",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "Buy two, get one free — offer ends Sunday!",
    "The defendant's counsel objected to the admissibility of the evidence.",
    "Mix the flour, sugar and butter until the dough is smooth.",
    "In 1969, Apollo 11 landed on the Moon.",
    "Sorry, I can't make it today.",
    "Yes.",
    "Absolutely not, under no circumstances whatsoever.",
    "def add(a, b): return a + b",
    "The mitochondria is the powerhouse of the cell.",
    "A sonnet has fourteen lines, usually in iambic pentameter.",
    "Traffic on the M25 is slow between junctions 10 and 12.",
    "Thermodynamics, entropy and the arrow of time remain puzzling.",
]


def sentences(n: int = 320, seed: int = 0) -> list[str]:
    """``n`` distinct sentences (captions, questions, assorted), shuffled with ``seed``."""
    captions = [f"{s[0].upper()}{s[1:]} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    questions = [q.format(n_) for q, n_ in itertools.product(QUESTIONS, NOUNS)]
    rng = random.Random(seed)
    rng.shuffle(captions)
    out = list(dict.fromkeys(OTHER + questions + captions))
    long = [" ".join(rng.sample(captions, 3)) for _ in range(20)]  # long, multi-sentence inputs
    out = list(dict.fromkeys(out[: n - len(long)] + long))
    rng.shuffle(out)
    return out[:n]
