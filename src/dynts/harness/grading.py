"""Answer extraction and grading for math and multiple-choice responses.

Why this module looks the way it does:

* Extraction reads only the text after the last ``</think>`` marker when the
  marker is present (the paper's protocol): a box written while thinking is a
  draft, not the answer. If the marker is present but nothing follows it, the
  model never answered and the result is ``None``. Without a marker (models
  that do not think out loud, or a generation cut off mid-thought) the whole
  text is used.
* Math answers are compared with Math-Verify. Its own timeouts use
  ``signal.alarm``, which only works in the main thread, so comparisons run in
  a small long-lived worker process that is killed when it overruns its time
  limit. A killed comparison counts as incorrect. A cheap string/number check
  runs first, so the worker is only asked when the answers are not trivially
  equal.

Nothing here imports torch or the engine; Math-Verify is only imported by the
worker process.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from fractions import Fraction

from dynts.config import THINK_END
from dynts.errors import DynTSError

KINDS = ("math", "choice")
DEFAULT_TIMEOUT_S = 5.0

# Startup (importing sympy) is not counted against a comparison's time limit.
_WORKER_START_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def extract_answer(response: str, kind: str) -> str | None:
    """The final answer a response commits to, or None when it gives none."""
    _check_kind(kind)
    segment = final_segment(response)
    if segment is None:
        return None
    if kind == "math":
        return _extract_math(segment)
    return _extract_choice(segment)


def grade(response: str, gold: str, kind: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``response`` answers ``gold`` correctly (choice gold: a letter)."""
    return grade_answer(extract_answer(response, kind), gold, kind, timeout=timeout)


def grade_answer(extracted: str | None, gold: str, kind: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Grade an already extracted answer, so callers can store both without re-extracting."""
    _check_kind(kind)
    if extracted is None:
        return False
    if kind == "choice":
        gold_letter = _bare_letter(str(gold))
        return gold_letter is not None and _bare_letter(extracted) == gold_letter
    return math_equal(str(gold), extracted, timeout=timeout)


def math_equal(gold: str, predicted: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Mathematical equivalence via Math-Verify, bounded by ``timeout`` seconds."""
    if timeout is None or timeout <= 0:
        raise DynTSError(f"grading timeout must be a positive number of seconds, got {timeout!r}")
    quick = _quick_equal(gold, predicted)
    if quick is not None:
        return quick
    return _VERIFIER.equal(gold, predicted, timeout)


def final_segment(response: str) -> str | None:
    """Text after the last ``</think>`` (whole text without one); None if nothing follows it."""
    cut = response.rfind(THINK_END)
    if cut < 0:
        return response
    tail = response[cut + len(THINK_END) :]
    return tail if tail.strip() else None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in ``text``."""
    found = None
    for match in _BOX_START.finditer(text):
        content = _box_content(text, match.end())
        if content is not None and content.strip():
            found = content.strip()
    return found


# --------------------------------------------------------------------------- #
# Math extraction
# --------------------------------------------------------------------------- #

_BOX_START = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS = re.compile(r"(?i:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<tail>[^\n]+)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_MAX_TEXT_ANSWER = 30
_INLINE_MATH = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)")


def _box_content(text: str, pos: int) -> str | None:
    """Parse the argument of a box command starting at ``pos`` (None if truncated)."""
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        # ``\boxed 5``: the argument is the next token.
        token = re.match(r"[^\s$]+", text[pos:])
        return token.group(0) if token else None
    depth = 0
    i = pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # escaped character such as \{ or \}
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i]
        i += 1
    return None


def _extract_math(segment: str) -> str | None:
    """Last box; else the last "answer is X" (inline math, a number or a short phrase);
    else the last number in the segment (a heuristic for models that never box)."""
    boxed = last_boxed(segment)
    if boxed is not None:
        return boxed
    statements = list(_ANSWER_IS.finditer(segment))
    if statements:
        stated = _answer_from_statement(statements[-1].group("tail"))
        if stated:
            return stated
    numbers = _NUMBER.findall(segment)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


def _answer_from_statement(tail: str) -> str | None:
    """From the rest of an "answer is ..." line, prefer inline math, then a number."""
    math = _INLINE_MATH.search(tail)
    if math:
        return (math.group(1) or math.group(2)).strip() or None
    number = _NUMBER.search(tail)
    if number:
        return number.group(0).replace(",", "")
    # A short bare phrase ("Monday") is an answer; a long one is prose, not an answer.
    cleaned = tail.strip().strip("*").strip().rstrip(".").strip()
    return cleaned if 0 < len(cleaned) <= _MAX_TEXT_ANSWER else None


# --------------------------------------------------------------------------- #
# Choice extraction
# --------------------------------------------------------------------------- #

_L = r"(?P<letter>[A-D])(?![A-Za-z0-9])"
_OPEN = r"[\s*:(\[{$]*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{)?[\s*(\[{]*"
# Explicit statements of the final choice; the last one in the text wins.
_STATEMENTS = [
    re.compile(r"(?i:answer)\s*(?:is|:|=)?\s*(?i:(?:option|choice)\s*)?" + _OPEN + _L),
    re.compile(r"(?i:(?:correct|right|best)\s+(?:option|choice)\s+is)\s*" + _OPEN + _L),
    re.compile(r"(?i:(?:option|choice))\s*\(?" + _L + r"\)?\s+(?i:is\s+(?:the\s+)?correct)"),
    re.compile(r"(?i:I\s+(?:choose|pick|select))\s*(?i:(?:option|choice)\s*)?" + _OPEN + _L),
]
# Weaker hints, used only when no box and no explicit statement exists.
_HINTS = [
    re.compile(r"(?i:option|choice)\s*\(?" + _L),
    re.compile(r"\*\*\s*\(?" + _L + r"\)?[.):]?\s*\*\*"),
    re.compile(r"\(" + _L + r"\)"),
    re.compile(r"(?m)^\s*" + _L + r"[.)]?\s*$"),
]


def _extract_choice(segment: str) -> str | None:
    """Tiered: last boxed letter, else last explicit statement, else last weak hint."""
    boxes = [_bare_letter(c) for c in _all_boxes(segment)]
    boxes = [b for b in boxes if b is not None]
    if boxes:
        return boxes[-1]
    for tier in (_STATEMENTS, _HINTS):
        best = None
        for pattern in tier:
            for match in pattern.finditer(segment):
                if best is None or match.start("letter") > best[0]:
                    best = (match.start("letter"), match.group("letter"))
        if best is not None:
            return best[1]
    return None


def _all_boxes(text: str) -> list[str]:
    out = []
    for match in _BOX_START.finditer(text):
        content = _box_content(text, match.end())
        if content is not None:
            out.append(content)
    return out


def _bare_letter(text: str) -> str | None:
    """ "B", "(B)", "\\text{B}", "B) 12 eV", "**B**" -> "B"; anything else -> None."""
    stripped = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*", "", text)
    stripped = stripped.replace("{", "").replace("}", "").replace("$", "")
    stripped = stripped.strip().strip("*").strip()
    match = re.match(r"\(?([A-D])(?:\)|\.|:|(?![A-Za-z0-9]))", stripped)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- #
# Cheap equality before Math-Verify
# --------------------------------------------------------------------------- #

_SPACING = re.compile(r"\\[,;:! ]|\\left|\\right|\s+")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_INT = re.compile(r"^-?\d+$")
_DECIMAL = re.compile(r"^-?\d+(?:\.\d+)?$")
_FRAC = re.compile(r"^(-?)\\frac\{(\d+)\}\{(\d+)\}$|^(-?)(\d+)/(\d+)$")


def _canonical(text: str) -> str:
    """A conservative textual normal form: only rewrites that never change the value."""
    s = text.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$") and "$" not in s.strip("$"):
        s = s.strip("$")
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    whole_text = re.fullmatch(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", s)
    if whole_text:
        s = whole_text.group(1)
    s = s.rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _as_fraction(s: str) -> Fraction | None:
    if len(s) > 40:
        return None
    if _DECIMAL.match(s):
        return Fraction(s)
    match = _FRAC.match(s)
    if match:
        sign, num, den = (
            (match.group(1), match.group(2), match.group(3))
            if match.group(2)
            else (match.group(4), match.group(5), match.group(6))
        )
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    return None


def _quick_equal(gold: str, predicted: str) -> bool | None:
    """True/False when the answer is obvious from the strings, None to ask Math-Verify."""
    g, p = _canonical(gold), _canonical(predicted)
    if not p:
        return False
    if g == p:
        return True
    if _INT.match(g) and _INT.match(p):
        return int(g) == int(p)
    gold_letter = re.fullmatch(r"\(?([A-K])\)?", g)
    if gold_letter:
        pred_letter = re.fullmatch(r"\(?([A-K])\)?", p)
        if pred_letter:
            return gold_letter.group(1) == pred_letter.group(1)
    gf, pf = _as_fraction(g), _as_fraction(p)
    if gf is not None and pf is not None and gf == pf:
        return True
    return None


# --------------------------------------------------------------------------- #
# Math-Verify worker process
# --------------------------------------------------------------------------- #

# The worker is a self-contained program (stdlib + math_verify only), so it
# starts without importing this package and works from any thread or caller.
_WORKER_SOURCE = r"""
import json, logging, sys
logging.disable(logging.WARNING)
try:
    from math_verify import parse, verify
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig
except Exception as exc:
    print(json.dumps({"fatal": "cannot import math_verify: %s" % exc}), flush=True)
    sys.exit(0)
CONFIGS = [LatexExtractionConfig(), ExprExtractionConfig()]
gold_cache = {}
def parse_gold(gold):
    if gold not in gold_cache:
        if len(gold_cache) > 4096:
            gold_cache.clear()
        text = gold if "$" in gold or "\\boxed" in gold else "$" + gold + "$"
        gold_cache[gold] = parse(text, extraction_config=CONFIGS, parsing_timeout=None)
    return gold_cache[gold]
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        gold = parse_gold(req["gold"])
        pred = parse("\\boxed{" + req["pred"] + "}", extraction_config=CONFIGS, parsing_timeout=None)
        ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
        reply = {"id": req["id"], "equal": ok}
    except Exception as exc:
        reply = {"id": req["id"], "equal": False, "error": repr(exc)[:200]}
    print(json.dumps(reply), flush=True)
"""


class _Worker:
    """One worker process plus a thread that forwards its stdout lines to a queue."""

    def __init__(self) -> None:
        self.replies: queue.Queue = queue.Queue()
        self.ready = False
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        reader = threading.Thread(target=self._read, name="dynts-grader-reader", daemon=True)
        reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.replies.put(json.loads(line))
            except ValueError:
                continue
        self.replies.put(None)  # end of stream: the process is gone

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class _Verifier:
    """Serializes comparisons onto the worker; kills and replaces it on overrun."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # stop() may run inside equal()
        self._worker: _Worker | None = None
        self._ids = itertools.count()

    def equal(self, gold: str, predicted: str, timeout: float) -> bool:
        with self._lock:
            worker = self._ready_worker()
            request_id = next(self._ids)
            try:
                worker.proc.stdin.write(json.dumps({"id": request_id, "gold": gold, "pred": predicted}) + "\n")
                worker.proc.stdin.flush()
            except OSError:
                self._replace()
                return False
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                try:
                    reply = worker.replies.get(timeout=max(remaining, 0.0))
                except queue.Empty:
                    self._replace()  # overran its time limit: counts as incorrect
                    return False
                if reply is None:
                    self._replace()  # crashed (e.g. out of memory)
                    return False
                if reply.get("id") == request_id:
                    return bool(reply.get("equal"))

    def _ready_worker(self) -> _Worker:
        if self._worker is None or self._worker.proc.poll() is not None:
            self._worker = _Worker()
        worker = self._worker
        if not worker.ready:
            try:
                first = worker.replies.get(timeout=_WORKER_START_TIMEOUT_S)
            except queue.Empty:
                first = None
            if not first or "fatal" in first:
                self.stop()
                reason = first.get("fatal") if first else "it did not start"
                raise DynTSError(
                    f"the Math-Verify grading worker is unusable ({reason}); "
                    "install it with: pip install 'math-verify>=0.7'"
                )
            worker.ready = True
        return worker

    def _replace(self) -> None:
        """Kill the current worker and start the next one now, so its import overlaps other work."""
        if self._worker is not None:
            self._worker.kill()
        self._worker = _Worker()

    def stop(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.kill()
                self._worker = None

    def forget_after_fork(self) -> None:
        """In a forked child the parent's worker and lock are not ours: start afresh."""
        self._lock = threading.RLock()
        self._worker = None


_VERIFIER = _Verifier()
atexit.register(_VERIFIER.stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_VERIFIER.forget_after_fork)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DynTSError(f"unknown answer kind {kind!r}; expected one of: {', '.join(KINDS)}")
