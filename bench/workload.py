"""A "function + its unit tests" workload: the shape in which code-generation benchmarks evaluate
samples. Each program defines a function and checks it, either with asserts in a `check`
function (HumanEval's way) or with a `unittest.TestCase` run by `unittest.main()`; some pass,
some fail (a wrong answer, or an exception in the function), some are slow. The work in each is
5-50 ms of CPU on this kind of machine.

The programs are generated from a seed, so every run of the benchmark judges the same ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: The function under test, by kind: (source, a call, its right answer). `{n}` is the work size.
FUNCTIONS = {
    "sum_of_squares": (
        "def solve(n):\n    total = 0\n    for i in range(n):\n        total += i * i % 7\n"
        "    return total\n",
        lambda n: sum(i * i % 7 for i in range(n)),
    ),
    "count_primes": (
        "def solve(n):\n    sieve = bytearray([1]) * n\n    sieve[0:2] = b'\\x00\\x00'\n"
        "    for i in range(2, int(n ** 0.5) + 1):\n        if sieve[i]:\n"
        "            sieve[i * i::i] = bytearray(len(range(i * i, n, i)))\n    return sum(sieve)\n",
        lambda n: _primes_below(n),
    ),
    "fib_mod": (
        "def solve(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, (a + b) % 1000003\n"
        "    return a\n",
        lambda n: _fib_mod(n),
    ),
    "word_lengths": (
        "def solve(n):\n    words = ['alpha', 'beta', 'gamma', 'delta'] * (n // 40)\n"
        "    counts = {}\n    for w in words:\n        counts[len(w)] = counts.get(len(w), 0) + 1\n"
        "    return sorted(counts.items())\n",
        lambda n: sorted({5: 3 * (n // 40), 4: n // 40}.items()),
    ),
}


def _primes_below(n: int) -> int:
    sieve = bytearray([1]) * n
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return sum(sieve)


def _fib_mod(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, (a + b) % 1000003
    return a


#: Work sizes: most programs quick, some slow (`slow` in the program's name).
QUICK_SIZES = (20_000, 50_000, 100_000)
SLOW_SIZES = (400_000, 600_000)


@dataclass(frozen=True)
class Program:
    name: str
    code: str
    passes: bool


def programs(count: int, seed: int = 19) -> list[Program]:
    """`count` programs: about 60% passing, 25% failing on a wrong answer (None), 15% raising; one in
    five slow; half checked with asserts, half with unittest."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        kind = rng.choice(sorted(FUNCTIONS))
        source, answer = FUNCTIONS[kind]
        slow = rng.random() < 0.2
        n = rng.choice(SLOW_SIZES if slow else QUICK_SIZES)
        roll = rng.random()
        outcome = "pass" if roll < 0.6 else ("wrong" if roll < 0.85 else "raise")
        expected = None if outcome == "wrong" else answer(n)
        body = source
        if outcome == "raise":
            body += "\n_solve = solve\ndef solve(n):\n    _solve(n)\n    return {}['missing']\n"
        style = "unittest" if k % 2 else "asserts"
        if style == "asserts":
            test = f"\ndef check(candidate):\n    assert candidate({n}) == {expected!r}\n\ncheck(solve)\n"
        else:
            test = (
                "\nimport unittest\n\nclass TestSolve(unittest.TestCase):\n"
                f"    def test_answer(self):\n        self.assertEqual(solve({n}), {expected!r})\n\n"
                "    def test_type(self):\n        self.assertIsNotNone(solve(10))\n\n"
                "if __name__ == '__main__':\n    unittest.main()\n"
            )
        label = f"{k:03d}-{kind}-{style}-{outcome}{'-slow' if slow else ''}"
        out.append(Program(label, body + test, passes=outcome == "pass"))
    return out
