"""A multi grader's `calculate_output`: `0.5 * accuracy + 0.5 * min(1, length)`, evaluated safely.

The hosted formula language: numbers, the names of the multi grader's own graders, `+ - * / ^`
(`^` is a power), parentheses, and the functions `min max abs floor ceil exp sqrt log`. Python's
`ast` parses it and a small walker evaluates only those nodes: nothing is ever `eval`ed.
"""
import ast
import math

FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
             "sqrt": math.sqrt, "log": math.log}
OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
             ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}
MAX_LENGTH = 1000


class FormulaError(ValueError):
    """A formula that does not parse, or names something other than its graders and the functions."""


def parse(formula: str, names: set[str]) -> ast.Expression:
    """The checked syntax tree of `formula`; `FormulaError` saying what is wrong."""
    if not isinstance(formula, str) or not formula.strip():
        raise FormulaError("calculate_output must be a formula, e.g. \"0.5 * a + 0.5 * b\"")
    if len(formula) > MAX_LENGTH:
        raise FormulaError(f"calculate_output is over {MAX_LENGTH} characters")
    try:
        tree = ast.parse(formula.replace("^", "**"), mode="eval")
    except SyntaxError as error:
        raise FormulaError(f"calculate_output does not parse: {error.msg} in {formula!r}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in names and node.id not in FUNCTIONS:
                raise FormulaError(f"calculate_output names {node.id!r}, which is neither one of the graders "
                                   f"({', '.join(sorted(names)) or 'none'}) nor a function "
                                   f"({', '.join(FUNCTIONS)})")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
                raise FormulaError(f"calculate_output may call only {', '.join(FUNCTIONS)}")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise FormulaError(f"calculate_output may hold only numbers, not {node.value!r}")
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, ast.USub, ast.UAdd,
                                   *OPERATORS)):
            raise FormulaError(f"calculate_output may use only + - * / ^, parentheses and the functions "
                               f"{', '.join(FUNCTIONS)} (found {type(node).__name__})")
    return tree


def evaluate(formula: str, values: dict[str, float]) -> float:
    """The formula's value with each grader's score in `values`; `FormulaError` if it cannot be computed."""
    tree = parse(formula, set(values))

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(values[node.id])
        if isinstance(node, ast.UnaryOp):
            operand = walk(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise FormulaError("calculate_output raises to a power over 64")
            return OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.Call):
            return float(FUNCTIONS[node.func.id](*[walk(argument) for argument in node.args]))
        raise FormulaError(f"cannot evaluate {type(node).__name__}")

    try:
        result = walk(tree)
    except (ArithmeticError, ValueError, TypeError) as error:
        raise FormulaError(f"calculate_output could not be computed: {error}") from None
    if not math.isfinite(result):
        raise FormulaError(f"calculate_output gave {result}")
    return result
