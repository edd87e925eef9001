"""Grader behaviour on tricky answers; the decisions tested here are documented in dynts.harness.grading."""

import threading
import time

import pytest

from dynts.errors import DynTSError
from dynts.harness.grading import extract_answer, grade, grade_answer, last_boxed, math_equal

# (response, gold, expected correctness)
MATH_CASES = [
    # fractions, decimals and fraction macros
    (r"So the result is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", True),
    (r"\boxed{\tfrac34}", r"\frac{3}{4}", True),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{4}", False),
    # units and degrees
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{90}", r"90^\circ", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    # intervals and sets
    (r"\boxed{[1, 2)}", "[1,2)", True),
    (r"\boxed{(1, 2]}", "[1,2)", False),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", True),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", True),
    # text answers
    (r"\boxed{\text{Monday}}", r"\text{Monday}", True),
    (r"\boxed{\text{(A)}}", "A", True),
    # negative numbers and thousands separators
    (r"\boxed{-7}", "-7", True),
    (r"\boxed{7}", "-7", False),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{1{,}000}", "1000", True),
    (r"\boxed{12345}", "12,345", True),
    # algebraic equivalence
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", True),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{x = 3}", "3", True),
    # several boxes: the last one wins
    (r"First \boxed{3}, on reflection \boxed{4}.", "4", True),
    (r"First \boxed{4}, on reflection \boxed{3}.", "4", False),
    # nested braces, brace-less box and \fbox
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"The answer: \boxed 9", "9", True),
    (r"\fbox{12}", "12", True),
    # no box: "answer is", then the last number
    ("The answer is 42.", "42", True),
    ("The final answer is $\\frac{1}{3}$.", r"\frac{1}{3}", True),
    ("She has 3 apples, then 5 more, so 8 in all", "8", True),
    ("I cannot solve this.", "8", False),
    ("The answer is Monday.", r"\text{Monday}", True),
    ("We get 12. The answer is that the pattern repeats every time, as shown.", "12", True),
    # thinking markers: only the text after </think> counts
    ("<think>maybe \\boxed{5}</think>The answer is \\boxed{6}.", "6", True),
    ("<think>it is \\boxed{5}</think>So I conclude it is six.", "5", False),
    ("<think>it is \\boxed{5}</think>   ", "5", False),
    ("<think>truncated thought \\boxed{5}", "5", True),
    ("<think>a</think>draft</think>Final: \\boxed{2}", "2", True),
]


@pytest.mark.parametrize("response,gold,expected", MATH_CASES)
def test_math_grading(response, gold, expected):
    assert grade(response, gold, "math") is expected


def test_math_extraction_details():
    assert extract_answer(r"x \boxed{\frac{a}{b}} y", "math") == r"\frac{a}{b}"
    assert extract_answer(r"\boxed{\{1,2\}}", "math") == r"\{1,2\}"
    # an unclosed box is not a box; the last-number fallback still finds 12
    assert extract_answer(r"ends in \boxed{12", "math") == "12"
    assert extract_answer("<think>5</think>", "math") is None
    assert extract_answer("It costs 1,234 dollars.", "math") == "1234"
    assert extract_answer("Answer: -3", "math") == "-3"
    assert last_boxed(r"\boxed{} then \boxed{7}") == "7"
    assert last_boxed(r"\boxed{7} then \boxed{}") == "7"


CHOICE_CASES = [
    (r"\boxed{B}", "B"),
    (r"\boxed{\text{B}}", "B"),
    (r"\boxed{(C)}", "C"),
    (r"\boxed{\textbf{(D)}}", "D"),
    (r"$\boxed{A}$", "A"),
    ("The answer is (B).", "B"),
    ("The correct answer is: C", "C"),
    ("Answer: D", "D"),
    ("**Answer:** **A**", "A"),
    ("Final Answer: (B) 12 eV", "B"),
    ("The correct option is C.", "C"),
    ("I choose option B.", "B"),
    ("After weighing everything, option D fits best.", "D"),
    ("So the best match is **C**", "C"),
    ("This leaves us with (A)", "A"),
    ("Reasoning...\nB", "B"),
    # last explicit statement wins; boxes outrank statements; statements outrank hints
    ("Answer: A. Wait, recheck. Answer: C", "C"),
    ("Option A looks wrong. The answer is B.", "B"),
    ("The answer is C. \\boxed{D}", "D"),
    # thinking is ignored once </think> is present
    ("<think>The answer is A</think>The answer is B", "B"),
    ("<think>The answer is A</think>I am not sure.", None),
    ("No letter here at all.", None),
    ("Answer: Both are plausible", None),
]


@pytest.mark.parametrize("response,letter", CHOICE_CASES)
def test_choice_extraction(response, letter):
    assert extract_answer(response, "choice") == letter


def test_choice_grading():
    assert grade("The answer is (B).", "B", "choice")
    assert grade(r"\boxed{B}", "(B)", "choice")
    assert not grade("The answer is (B).", "C", "choice")
    assert not grade("nothing", "A", "choice")


def test_unknown_kind_is_a_user_error():
    with pytest.raises(DynTSError, match="math, choice"):
        grade(r"\boxed{1}", "1", "essay")
    with pytest.raises(DynTSError):
        extract_answer("x", "open")


def test_none_answer_is_wrong():
    assert grade_answer(None, "1", "math") is False


def test_pathological_answer_times_out_as_incorrect():
    # Math-Verify would try to evaluate a tower of powers for a very long time.
    math_equal("1", r"\frac{1}{2} + x")  # warm the worker so startup is not timed
    start = time.monotonic()
    assert math_equal("5", "9^{9^{9^{9}}}", timeout=1.0) is False
    elapsed = time.monotonic() - start
    assert elapsed < 3.0
    # The worker is replaced, so the next comparison still works.
    assert math_equal(r"\frac{\pi}{2}", r"\pi/2", timeout=30) is True


def test_grading_works_from_threads():
    results = []

    def work(gold, pred, timeout):
        results.append(math_equal(gold, pred, timeout=timeout))

    jobs = [(r"2\sqrt{2}", r"\sqrt{8}", 30)] * 4 + [("1", "9^{9^{9^{9}}}", 1.0)]
    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [False, True, True, True, True]


def test_timeout_must_be_positive():
    with pytest.raises(DynTSError):
        math_equal("1", "x+1", timeout=0)
