"""The design card's rules that a grep can check: product code (everything but tests/) builds
attention from primitives and imports no off-the-shelf transformer library."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(
    r"nn\.MultiheadAttention|nn\.Transformer(Encoder|Decoder)?(Layer)?\b"
    r"|^\s*(import|from)\s+(einops|timm|transformers|open_clip|torchvision|albumentations)\b",
    re.MULTILINE)


def product_files():
    """Every .py file but the tests and the benchmark, which times other libraries on purpose
    (bench.py imports open_clip inside a function, only where it is installed)."""
    return [p for p in ROOT.rglob("*.py")
            if not {"tests", ".git", ".venv", "runs"} & set(p.relative_to(ROOT).parts)
            and p.name != "bench.py"]


def test_product_code_uses_no_off_the_shelf_transformer():
    files = product_files()
    assert any(p.name == "train.py" for p in files)
    offenders = {str(p.relative_to(ROOT)): m.group(0) for p in files
                 for m in [FORBIDDEN.search(p.read_text())] if m}
    assert offenders == {}


def test_the_forbidden_pattern_catches_what_it_should():
    for text in ["import transformers", "from einops import rearrange", "nn.MultiheadAttention(",
                 "nn.TransformerEncoderLayer(", "  from timm.models import vit",
                 "import torchvision.models", "from albumentations import HorizontalFlip"]:
        assert FORBIDDEN.search(text), text
    assert not FORBIDDEN.search("from shared.transformer import PreLNEncoderBlock")


def test_paper_files_import_only_torch_numpy_stdlib_and_shared():
    allowed = {"torch", "numpy", "shared", "math", "dataclasses", "typing", "collections",
               "functools", "itertools", "random", "json", "pathlib", "__future__", "copy", "re"}
    for name in ["oscar.py", "uniter.py", "virtex.py", "coca.py"]:
        path = ROOT / name
        if not path.exists():
            continue
        roots = set(re.findall(r"^(?:from|import)\s+([A-Za-z_]\w*)", path.read_text(), re.MULTILINE))
        assert roots <= allowed, (name, roots - allowed)


def test_shared_imports_no_paper_file_and_not_train():
    """The layers: shared/ knows no paper; the paper files know only shared/; train.py and the
    command-line tools sit on top. Nothing imports upward (imports inside functions included)."""
    import ast

    top = {"train", "infer", "extract", "bench", "oscar", "uniter", "virtex", "coca"}
    for path in sorted((ROOT / "shared").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & top, (path.name, imported & top)
        assert "import_module" not in path.read_text(), path.name
    for name in ["oscar.py", "uniter.py", "virtex.py", "coca.py"]:
        text = (ROOT / name).read_text()
        others = top - {name[:-3]}
        assert not re.findall(rf"^\s*(?:from|import)\s+({'|'.join(others)})\b", text,
                              re.MULTILINE), name


def test_shared_init_lists_every_module():
    listed = set(re.findall(r"^\s+(\w+)\.py\s", (ROOT / "shared" / "__init__.py").read_text(),
                            re.MULTILINE))
    modules = {p.stem for p in (ROOT / "shared").glob("*.py")} - {"__init__"}
    assert listed == modules, (modules - listed, listed - modules)


def test_train_imports_no_other_script():
    """No cycle: infer.py, extract.py and bench.py import train (to load a checkpoint), never
    the reverse; what train.py shares with them lives in shared/ (imports inside functions
    included)."""
    import ast

    tree = ast.parse((ROOT / "train.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"infer", "extract", "bench"}


def test_shared_and_the_scripts_never_choose_by_a_model_name():
    """shared/, infer.py and extract.py pick what to run by what a paper declares (INPUTS,
    PROTOCOLS, CROSS_ENCODER), never by its name: a sixth paper file gets everything the four
    get. (train.py: tests/test_train.py; bench.py times each paper against its own reference
    library, so it names them.)"""
    import ast

    names = {"oscar", "uniter", "virtex", "coca"}
    for path in [*sorted((ROOT / "shared").glob("*.py")), ROOT / "infer.py", ROOT / "extract.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = {c.value for part in [node.left, *node.comparators]
                             for c in ast.walk(part) if isinstance(c, ast.Constant)}
                assert not names & constants, (path.name, node.lineno)


FENCE = "# ===== below: train.py's contract, not in the paper ====="
SECTION = re.compile(r"^# --- (\d+)\. ", re.MULTILINE)
MODEL_BLOCKS = {"shared.attention", "shared.masks", "shared.transformer", "shared.decoding",
                "shared.losses", "shared.ot", "shared.distributed"}


def fence_problems(text: str) -> list[str]:
    """What keeps a paper file from reading as the paper first: one fence line, at most 700
    lines above it, sections 1-6 above and 7-9 below (the same skeleton in every paper file),
    and above the fence imports of the standard library, torch, numpy and model blocks only."""
    if text.count(FENCE) != 1:
        return [f"{text.count(FENCE)} fence lines, want 1"]
    above, below = text.split(FENCE)
    problems = []
    if above.count("\n") > 700:
        problems.append(f"{above.count(chr(10))} lines above the fence, want <= 700")
    numbers = [int(n) for n in SECTION.findall(above)], [int(n) for n in SECTION.findall(below)]
    if numbers != ([1, 2, 3, 4, 5, 6], [7, 8, 9]):
        problems.append(f"sections {numbers[0]} above and {numbers[1]} below, want 1-6 and 7-9")
    for module in re.findall(r"^\s*from\s+(shared\.\w+|shared)\s+import", above, re.MULTILINE):
        if module not in MODEL_BLOCKS:
            problems.append(f"{module} imported above the fence")
    for module in re.findall(r"^\s*import\s+(shared\.\w+)", above, re.MULTILINE):
        if module not in MODEL_BLOCKS:
            problems.append(f"{module} imported above the fence")
    return problems


def test_each_paper_file_has_the_paper_above_a_fence_and_the_contract_below():
    problems = {name: fence_problems((ROOT / name).read_text())
                for name in ["oscar.py", "uniter.py", "virtex.py", "coca.py"]}
    assert {k: v for k, v in problems.items() if v} == {}


def test_the_fence_check_fails_where_it_should():
    sections = "".join(f"# --- {n}. x\n" for n in range(1, 7))
    good = f"import torch\nfrom shared.masks import causal_mask\n{sections}{FENCE}\n" \
           "from shared.data import Epochs\n# --- 7. a\n# --- 8. b\n# --- 9. c\n"
    assert fence_problems(good) == []
    assert fence_problems(good.replace(FENCE, "")) == ["0 fence lines, want 1"]
    assert fence_problems(good.replace("shared.masks", "shared.world"))
    assert fence_problems(good.replace("# --- 6. x\n", ""))
    assert fence_problems("\n" * 701 + good)


def test_importing_a_paper_file_does_not_load_the_world():
    import subprocess
    import sys

    for name in ["oscar", "uniter", "virtex", "coca"]:
        out = subprocess.run([sys.executable, "-c", f"import sys, {name}; "
                              "print('shared.world' in sys.modules)"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == "False", name
