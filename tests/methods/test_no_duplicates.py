"""What the methods share lives once: no block of fedsim/methods is a copy of another.

Two kinds of copy are looked for, with the standard library alone (``tokenize``, ``ast``):
- a run of ``MIN_LINES`` code lines that stands twice as is (white space, comments, docstrings and imports aside);
- a function of ``MIN_LINES`` code lines or more that is another one with its names, strings and numbers changed
  consistently (each renamed the same way throughout: a copy whose variables were renamed).
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from pathlib import Path

MIN_LINES = 6
METHODS = Path(__file__).resolve().parents[2] / "fedsim" / "methods"
SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def code_lines(source: str) -> dict[int, list[tokenize.TokenInfo]]:
    """Each line's tokens, for the lines that hold code: docstrings, imports, comments, blank lines and lines of
    punctuation alone left out."""
    tree = ast.parse(source)
    passed = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            passed.update(range(node.lineno, node.end_lineno + 1))
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            passed.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines: dict[int, list[tokenize.TokenInfo]] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in SKIPPED and token.start[0] not in passed:
            lines.setdefault(token.start[0], []).append(token)
    return {number: tokens for number, tokens in lines.items() if any(t.type != tokenize.OP for t in tokens)}


def renamed(tokens: list[tokenize.TokenInfo]) -> tuple[str, ...]:
    """The tokens with every name, string and number replaced by its order of first appearance: equal for two
    blocks exactly when one is the other with its names, strings and numbers changed consistently."""
    first_seen: dict[tuple[int, str], int] = {}
    out = []
    for t in tokens:
        if t.type in (tokenize.NAME, tokenize.STRING, tokenize.NUMBER) and not keyword.iskeyword(t.string):
            out.append(f"{t.type}:{first_seen.setdefault((t.type, t.string), len(first_seen))}")
        else:
            out.append(t.string)
    return tuple(out)


def copies(files: list[Path], min_lines: int = MIN_LINES) -> list[str]:
    """Every copy in ``files``, as ``a.py:10-17 ~ b.py:40-47``."""
    runs: dict[tuple, list[tuple[str, int, int, int]]] = {}
    shapes: dict[tuple, list[tuple[str, int, int]]] = {}
    for path in files:
        source = path.read_text()
        lines = code_lines(source)
        numbers = sorted(lines)
        texts = [" ".join(t.string for t in lines[n]) for n in numbers]
        for i in range(len(numbers) - min_lines + 1):
            runs.setdefault(tuple(texts[i:i + min_lines]), []).append((path.name, i, numbers[i], numbers[i + min_lines - 1]))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = [n for n in numbers if node.body[0].lineno <= n <= node.end_lineno]
                if len(body) >= min_lines:
                    tokens = [t for n in body for t in lines[n]]
                    shapes.setdefault(renamed(tokens), []).append((path.name, node.lineno, node.end_lineno))
    found = []
    for places in runs.values():
        for k, (file_a, i, start_a, end_a) in enumerate(places):
            for file_b, j, start_b, end_b in places[k + 1:]:
                if file_a != file_b or abs(i - j) >= min_lines:  # not the same lines seen twice by overlapping windows
                    found.append(f"{file_a}:{start_a}-{end_a} ~ {file_b}:{start_b}-{end_b}")
    for places in shapes.values():
        found += [f"{a}:{sa}-{ea} ~ {b}:{sb}-{eb} (renamed)" for k, (a, sa, ea) in enumerate(places) for b, sb, eb in places[k + 1:]]
    return found


def test_methods_folder_has_no_copied_blocks():
    files = sorted(METHODS.glob("*.py"))
    assert len(files) > 10
    found = copies(files)
    assert not found, "copied blocks (make one serve both, e.g. in fedsim/methods/base.py):\n" + "\n".join(found)


FUNCTION = '''
def spread(values, weights):
    """Docstrings, comments and imports are not code."""
    total = sum(weights)
    scaled = [v * w / total for v, w in zip(values, weights)]
    mean = sum(scaled)
    deviations = [(v - mean) ** 2 for v in values]
    spread = sum(d * w for d, w in zip(deviations, weights)) / total
    return mean, spread ** 0.5
'''


def test_the_check_finds_a_copy_as_is_and_a_renamed_one(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(FUNCTION)  # the function's 7 code lines: 2 and 4-9
    b.write_text("def other(x):\n    return x\n")
    assert copies([a, b]) == []
    b.write_text("import math\n# a copy under another name\n" + FUNCTION.replace("spread(", "dispersion("))
    assert copies([a, b]) == ["a.py:4-9 ~ b.py:6-11", "a.py:2-9 ~ b.py:4-11 (renamed)"]
    renamed_copy = FUNCTION.replace("values", "xs").replace("weights", "ws").replace("mean", "centre").replace("0.5", "0.25")
    b.write_text(renamed_copy)
    assert copies([a, b]) == ["a.py:2-9 ~ b.py:2-9 (renamed)"]
    b.write_text(renamed_copy.replace("(v - centre) ** 2", "abs(v - centre)"))  # not a copy any more
    assert copies([a, b]) == []
