"""Seeded synthetic LilyPond snippets in the spirit of im2ly-35k-syn.

``\\relative c'' { \\key g \\major \\time 3/4 d4 e8 fis g4 | a2 r4 | ... }``: a key and time signature, then 2-6 full
bars of notes (pitches with accidentals and the odd octave mark), rests, dotted values, ties and slurs. Every bar
is filled exactly to its time signature, so LilyPond's bar checks (``|``) pass. A duration is written only when
it changes, as people write LilyPond.
"""

from __future__ import annotations

import random

KEYS = [("c", "major"), ("g", "major"), ("d", "major"), ("f", "major"), ("bes", "major"), ("a", "minor"),
        ("e", "minor"), ("d", "minor")]  # fmt: skip
TIMES = [(4, 4), (4, 4), (4, 4), (3, 4), (2, 4), (6, 8)]
# LilyPond duration -> length in sixteenths
DURATIONS = {"1": 16, "2.": 12, "2": 8, "4.": 6, "4": 4, "8.": 3, "8": 2, "16": 1}
# weights that favour quarters and eighths, as in simple tunes
DURATION_WEIGHTS = {"1": 1, "2.": 1, "2": 4, "4.": 2, "4": 10, "8.": 1, "8": 8, "16": 2}
STEPS = "cdefgab"


def _pitch(rng: random.Random) -> str:
    name = rng.choice(STEPS)
    r = rng.random()
    if r < 0.12:
        name += "is"
    elif r < 0.22:
        name += "es" if name not in "ae" else "s"  # aes -> as, ees -> es
    if rng.random() < 0.05:  # relative mode: octave marks accumulate, so keep them rare
        name += rng.choice(["'", ","])
    return name


def _bar(rng: random.Random, length: int) -> list[tuple[str, str]]:
    """(pitch or 'r', duration) events filling ``length`` sixteenths."""
    events = []
    left = length
    while left > 0:
        fitting = [d for d, n in DURATIONS.items() if n <= left]
        dur = rng.choices(fitting, weights=[DURATION_WEIGHTS[d] for d in fitting])[0]
        events.append(("r" if rng.random() < 0.12 else _pitch(rng), dur))
        left -= DURATIONS[dur]
    return events


def generate_music(rng: random.Random) -> str:
    """One ``\\relative c'' { ... }`` snippet on a single line."""
    tonic, mode = rng.choice(KEYS)
    num, den = rng.choice(TIMES)
    length = 16 * num // den
    out = ["\\relative", "c''", "{"]
    if rng.random() < 0.8:
        out += ["\\key", tonic, f"\\{mode}"]
    out += ["\\time", f"{num}/{den}"]
    n_bars = rng.choice([2, 2, 3, 3, 4, 4, 4, 5, 6])
    previous_dur = ""
    for _ in range(n_bars):
        events = _bar(rng, length)
        slur_from: int | None = None  # index in ``out`` of the note that opened a slur in this bar
        for i, (pitch, dur) in enumerate(events):
            token = pitch + (dur if dur != previous_dur else "")
            previous_dur = dur
            if pitch != "r" and slur_from is not None and rng.random() < 0.4:
                token += ")"
                slur_from = -1  # closed
            elif pitch != "r" and slur_from is None and i + 1 < len(events) and rng.random() < 0.08:
                token += "("
                slur_from = len(out)
            out.append(token)
            nxt = events[i + 1] if i + 1 < len(events) else None
            if pitch != "r" and nxt is not None and nxt[0] != "r" and rng.random() < 0.05:
                # a tie joins equal pitches: repeat this pitch as the next note
                out.append("~")
                events[i + 1] = (pitch.rstrip("',"), nxt[1])
        if slur_from is not None and slur_from >= 0:  # a slur must end in its bar, on a later note
            last_note = max(j for j, tok in enumerate(out) if tok[0] in STEPS)
            if last_note > slur_from:
                out[last_note] += ")"
            else:
                out[slur_from] = out[slur_from][:-1]
        out.append("|")
    out[-1] = '\\bar "|."'
    out.append("}")
    return " ".join(out)
