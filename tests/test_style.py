"""
The core's size and shape rules, checked on every run (fast): the four core scripts within their budget of code
tokens, no function in them over 80 lines, no import of a leaf, no comment on a `def` line.
"""

import ast
import io
import os
import tokenize

# the repository: train.py, model.py... are here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["train.py", "model.py", "data.py", "infer.py"]
# code tokens the four core scripts may hold together (comments and docstrings are free)
BUDGET = 21_500
MAX_FUNCTION_LINES = 80
# tokens that are not code: /work/shared/tools/code_tokens.py's rule, written out here so that the test needs nothing
# outside the repository
FREE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
}


def source(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def docstring_starts(src):
    """(line, column) where each docstring (of the module, a class or a function) starts."""
    starts = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                starts.add((first.value.lineno, first.value.col_offset))
    return starts


def code_tokens(src):
    """Every token but comments, docstrings, blank lines, indentation and newlines."""
    docs = docstring_starts(src)
    n = 0
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in FREE or (tok.type == tokenize.STRING and tok.start in docs):
            continue
        n += 1
    return n


def test_code_tokens_counts_code_only():
    """The counter itself: comments, docstrings, blank lines and indentation are free; every other token counts."""
    src = '"""module doc"""\n\n\ndef f(x):  # why\n    """doc"""\n    # more\n    return x + "s"\n'
    # def f ( x ) : return x + "s"
    assert code_tokens(src) == 10
    assert code_tokens(src.replace("return x", "return  (x)")) == 12


def test_the_core_stays_within_its_token_budget():
    counts = {name: code_tokens(source(name)) for name in CORE}
    assert sum(counts.values()) <= BUDGET, counts


def test_no_core_function_is_over_80_lines():
    long = []
    for name in CORE:
        for node in ast.walk(ast.parse(source(name))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long


def test_the_core_imports_no_leaf():
    """The core imports only itself and libraries: never a leaf (bench.py, demo.py, check_data.py, ..., the aloha/ and
    robotwin/ folders) nor a test, at the top or inside a function."""
    leaves = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")} - {name[:-3] for name in CORE}
    leaves |= {name for name in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, name, "")) and name != "tests"}
    leaves |= {"tests", "helpers", "conftest"}
    assert {"bench", "demo", "check_data", "merge", "serve", "plot", "aloha", "robotwin", "test_smoke"} <= leaves
    for name in CORE:
        tree = ast.parse(source(name))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & leaves, (name, imported & leaves)


def comments_on_def_lines(src):
    """(line, text) of each comment in a `def` or `class` header: after its keyword, up to the end of the line of the
    colon that ends it (a signature may span lines)."""
    found, in_header, depth, colon_line = [], False, 0, None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and tok.string in ("def", "class") and not in_header:
            in_header, depth = True, 0
        elif in_header and tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif in_header and tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif in_header and tok.type == tokenize.OP and tok.string == ":" and depth == 0:
            in_header, colon_line = False, tok.start[0]
        if tok.type == tokenize.COMMENT and (in_header or tok.start[0] == colon_line):
            found.append((tok.start[0], tok.line.strip()))
    return found


def test_comments_on_def_lines_are_found():
    src = (
        "def f(x):  # on the line\n    # above the code: fine\n    return x\n\n\n"
        "def g(\n    a,  # in the signature\n    b: dict[str, int] = {},\n) -> list[int]:\n    return [a]\n\n\n"
        "class C:  # on a class line\n    pass\n"
    )
    assert [line for line, _ in comments_on_def_lines(src)] == [1, 7, 13]


def test_no_comment_on_a_def_line():
    """Comments go above the code they explain; a `def` line holds the signature only."""
    found = [f"{name}:{line}: {text}" for name in CORE for line, text in comments_on_def_lines(source(name))]
    assert not found
