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


# The calibration pool: the same kinds as OTHER and QUESTIONS (short replies, other languages, code, numbers,
# questions) but none of their sentences, so that a search tuned on it meets such inputs without having seen
# the judged ones (a pool of captions only never showed the search a four-token reply)
CALIBRATION_OTHER = [
    "No.",
    "Okay, thanks!",
    "Maybe tomorrow.",
    "Wait, what?",
    "Der Zug fährt um acht Uhr ab.",
    "Il pleut depuis trois jours sans arrêt.",
    "for i in range(10): print(i)",
    "Invoice #4471 is due on 30 June 2025.",
    "Warning: low battery (5% remaining).",
    "The patient reported mild pain after the second dose.",
    "Turn left at the second roundabout, then park behind the school.",
    "Shares fell 3.2% after the earnings call on Thursday.",
    'He whispered, "Don\'t tell anyone, okay?"',
    "Plate tectonics explains why earthquakes cluster along ridges.",
    "Never again.",
    "Sure, I'll send the slides tonight.",
]
CALIBRATION_NOUNS = ["scooter", "parrot", "clock", "ladder", "suitcase", "fountain"]


def calibration_sentences(n: int = 64, seed: int = 7) -> list[str]:
    """``n`` sentences of the kinds :func:`sentences` has, none of them among its first 320 (seed 0)."""
    judged = set(sentences(320))
    questions = [q.format(n_) for q, n_ in itertools.product(QUESTIONS, CALIBRATION_NOUNS)]
    captions = [
        c for c in sentences(2000, seed=seed) if c not in judged and c[0].isupper() and c.count(".") == 1
    ]
    rng = random.Random(seed)
    rng.shuffle(questions)
    picked = CALIBRATION_OTHER + questions[: n // 4]
    long = [" ".join(rng.sample(captions, 3)) for _ in range(n // 10)]
    picked += long + captions[: max(0, n - len(picked) - len(long))]
    rng.shuffle(picked)
    assert not judged & set(picked)
    return picked[:n]


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
