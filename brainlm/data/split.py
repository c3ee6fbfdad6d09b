"""Subject-level splits: every recording of a subject lands on the same side."""

from __future__ import annotations

import hashlib

from ..errors import ConfigError

SPLITS = ("train", "val", "test")


def assign_splits(subjects, fractions=(0.8, 0.1, 0.1), seed: int = 0,
                  fixed: dict[str, str] | None = None) -> dict[str, str]:
    """{subject: split}. Deterministic for a seed and independent of input order.

    Subjects are ranked by a seeded hash of their id and cut at the fractions, so adding
    subjects later moves few existing ones. Every split with a non-zero fraction gets at least
    one subject when there are enough. `fixed` (e.g. a `split` column of participants.tsv)
    wins for the subjects it names.
    """
    if len(fractions) != 3 or not all(f >= 0 for f in fractions) or \
            not abs(sum(fractions) - 1) <= 1e-6:  # NaN fails both
        raise ConfigError(f"split fractions {tuple(fractions)} must be three non-negative "
                          "numbers summing to 1 (train, val, test)")
    fixed = {s: v for s, v in (fixed or {}).items() if s in set(subjects)}
    for subject, value in fixed.items():
        if value not in SPLITS:
            raise ConfigError(f"subject {subject}: split '{value}' is not one of {SPLITS}")
    free = sorted({s for s in subjects if s not in fixed},
                  key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n = len(free)
    exact = [f * n for f in fractions]  # largest remainder: counts sum to n, none negative
    counts = [int(e) for e in exact]
    for i in sorted(range(3), key=lambda j: exact[j] - counts[j], reverse=True)[:n - sum(counts)]:
        counts[i] += 1
    if n >= sum(f > 0 for f in fractions):
        for i, f in enumerate(fractions):  # no empty split that was asked for
            if f > 0 and counts[i] == 0:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    out = dict(fixed)
    start = 0
    for name, count in zip(SPLITS, counts):
        for subject in free[start:start + count]:
            out[subject] = name
        start += count
    return out
