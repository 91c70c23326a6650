"""Answer extraction and scoring for generated text: GSM8K numbers, MATH boxed answers, commonsense answer words.

The rules follow the evaluation scripts the Fed-SB paper uses (arXiv:2502.15436; those of MetaMath and
LLM-Adapters):

- GSM8K: the gold answer is the number after ``#### ``; a completion's answer is the first number after
  its last answer marker, ``The answer is`` (MetaMathQA's format) or ``####`` (GSM8K's own). No marker,
  no answer (strict, as MetaMath's ``extract_answer_number``). Numbers compare as values (``1,000`` =
  ``1000.0``).
- MATH: the gold answer is the last ``\\boxed{...}`` (or ``\\fbox{...}``) of the solution; a completion's
  is its last ``\\boxed{...}``, else the text after its last ``The answer is``. Both are normalised as in
  Hendrycks et al.'s ``is_equiv`` (spaces, ``\\left``/``\\right``, ``dfrac``, units, ``0.5`` = ``.5``...)
  before comparing strings.
- commonsense: the first answer word of the set's vocabulary found in the lower-cased completion
  (BoolQ true/false, PIQA solution1/2, SIQA/ARC/OBQA answer1-5, HellaSwag ending1-4, WinoGrande
  option1/2), compared with the record's ``answer`` field.
"""

from __future__ import annotations

import re

# The answer words of each commonsense set, in the order LLM-Adapters' regexes list them.
COMMONSENSE_ANSWERS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}
COMMONSENSE_SETS = tuple(COMMONSENSE_ANSWERS)
# Generation stops here (vLLM's stop strings in the paper's evaluation): text from the first one on is dropped.
STOP_STRINGS = ("### Instruction", "Instruction:", "### Response", "Response:")

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_ANSWER_MARKERS = re.compile(r"The answer is:?|####", re.IGNORECASE)


def cut_at_stop(text: str, stops=STOP_STRINGS) -> str:
    """``text`` up to the first stop string (what vLLM's ``stop=`` returns)."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


# --------------------------------------------------------------------------------------------- GSM8K


def _to_number(text: str) -> float | None:
    text = text.replace(",", "").rstrip(".")
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(text)
    except ValueError:
        return None


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K ``answer`` field: the text after ``#### `` (commas removed)."""
    if "####" not in answer:
        raise ValueError("a GSM8K answer ends with '#### <number>'")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def extract_number(completion: str) -> str | None:
    """The first number after the last answer marker (``The answer is``/``####``) of a completion, or None."""
    markers = list(_ANSWER_MARKERS.finditer(completion))
    if not markers:
        return None
    match = _NUMBER.search(completion[markers[-1].end():])
    return match.group().replace(",", "") if match else None


def numbers_equal(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    a, b = _to_number(predicted), _to_number(gold)
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


# ---------------------------------------------------------------------------------------------- MATH


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched), or of ``\\boxed x``; None if absent."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    rest = text[at:]
    if rest.startswith("\\boxed ") and not rest.startswith("\\boxed {"):
        return rest[len("\\boxed "):].split("$")[0].strip()
    open_at = rest.find("{")
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[open_at + 1 : i]
    return None


def math_gold(solution: str) -> str:
    boxed = last_boxed(solution)
    if boxed is None:
        raise ValueError("a MATH solution holds its final answer in \\boxed{...}")
    return boxed


def extract_math(completion: str) -> str | None:
    """A completion's MATH answer: its last ``\\boxed{}``, else the text after its last ``The answer is``."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    markers = list(re.finditer(r"The answer is:?", completion, re.IGNORECASE))
    if not markers:
        return None
    answer = completion[markers[-1].end():].strip().split("\n")[0].strip()
    return answer.rstrip(".").strip("$ ") or None


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += f"{{{a}}}{{{b}}}{rest}" if b != "{" else f"{{{a}}}{b}{rest}"
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_math(s: str) -> str:
    """Hendrycks et al.'s ``strip_string`` (the MATH benchmark's answer normaliser), lightly extended."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "x = 5" -> "5"
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):  # "5.00" -> "5"
        s = s.split(".")[0]
    return s


def math_equal(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    return normalize_math(predicted) == normalize_math(gold)


# --------------------------------------------------------------------------------------- commonsense


def extract_choice(subset: str, completion: str) -> str:
    """The first of ``subset``'s answer words in the lower-cased completion; "" if none."""
    words = COMMONSENSE_ANSWERS[subset]
    found = re.findall("|".join(words), completion.strip().lower())
    return found[0] if found else ""


# ------------------------------------------------------------------------------------------- scoring

SCORERS = ("gsm8k", "math", "choice")


def score(scorer: str, subset: str, completion: str, gold: str) -> bool:
    """Is ``completion`` (already cut at the stop strings) right? ``scorer`` comes from the eval row."""
    if scorer == "gsm8k":
        return numbers_equal(extract_number(completion), gold)
    if scorer == "math":
        return math_equal(extract_math(completion), gold)
    if scorer == "choice":
        return extract_choice(subset, completion) == gold
    raise ValueError(f"unknown scorer {scorer!r}; valid: {', '.join(SCORERS)}")
