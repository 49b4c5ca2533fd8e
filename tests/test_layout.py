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


def model_name_comparisons(path: Path) -> list[int]:
    """The lines of `path` that compare something with a paper's name, outside
    train.import_paper (the one registration of the paper files)."""
    import ast

    names = {"oscar", "uniter", "virtex", "coca"}
    tree = ast.parse(path.read_text())
    registration = {id(n) for f in ast.walk(tree)
                    if isinstance(f, ast.FunctionDef) and f.name == "import_paper"
                    for n in ast.walk(f)}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Compare) and id(node) not in registration
            and names & {c.value for part in [node.left, *node.comparators]
                         for c in ast.walk(part) if isinstance(c, ast.Constant)}]


def test_shared_and_the_scripts_never_choose_by_a_model_name():
    """shared/ and every script pick what to run by what a paper declares (INPUTS, PROTOCOLS,
    CROSS_ENCODER, its methods), never by its name: a sixth paper file gets everything the
    four get. The paper files themselves may name their own model."""
    scripts = [p for p in ROOT.glob("*.py") if p.stem not in {"oscar", "uniter", "virtex", "coca"}]
    assert {"train", "infer", "extract", "bench"} <= {p.stem for p in scripts}
    found = {f"{p.relative_to(ROOT)}:{line}" for p in [*scripts, *(ROOT / "shared").glob("*.py")]
             for line in model_name_comparisons(p)}
    assert found == set()


def test_the_model_name_check_fails_where_it_should(tmp_path):
    code = tmp_path / "script.py"
    code.write_text('def import_paper(name):\n    return name == "coca"\n\n'
                    'def run(run):\n    if run["model"] in ("uniter", "oscar"):\n        pass\n')
    assert model_name_comparisons(code) == [5]


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


# --- references: the files and names the project cites exist ----------------------------------

REFERENCED_PATH = re.compile(
    r"(?<![\w./~-])((?:\.\./)*(?:[\w.-]+/)*[\w-][\w.-]*\.(?:py|md|txt|json))(?![\w/-])")
CLIMB = re.compile(r"(?<![\w.])(?:\.\./)+[\w.-]*")  # a relative path that goes up a folder
DOTTED_NAME = re.compile(r"(?<![\w./-])([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)")
ADDRESS = re.compile(r"\b(?:https?://|www\.|github\.com/)\S+")
OTHER_CODEBASE = re.compile(r"\bcode\b|github\.com/|'s\s+`?[\w-]+\.py\b")


def cited_files() -> list[Path]:
    """What a reader reads: the documents, the requirements and every .py file (its comments
    and docstrings)."""
    return [ROOT / "README.md", ROOT / "RESULTS.md", *sorted(ROOT.glob("requirements*.txt")),
            *sorted((ROOT / "reference").glob("*.md")),
            *sorted(p for p in ROOT.rglob("*.py") if not {".git", ".venv", "runs", "__pycache__"}
                    & set(p.relative_to(ROOT).parts))]


def reader_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text): every line of a document; the comments and docstrings of a .py file
    (code and its other strings are not prose)."""
    import ast
    import io
    import tokenize

    text = path.read_text()
    if path.suffix != ".py":
        return list(enumerate(text.split("\n"), 1))
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    lines = {(tok.start[0], tok.string) for tok in tokens if tok.type == tokenize.COMMENT}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = node.body[0] if node.body else None
            if (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                lines |= {(doc.lineno + i, line)
                          for i, line in enumerate(doc.value.value.split("\n"))}
    return sorted(lines)


def source_folders() -> set[str]:
    """The project's folders of code and documents: top-level folders with .py or .md files,
    but not runs/ (training outputs) or hidden ones."""
    return {d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")
            and d.name != "runs" and (any(d.glob("*.py")) or any(d.glob("*.md")))}


MODULE_NAMES = {}  # module path -> its top-level names, each file parsed once


def module_names(relative: str) -> dict:
    """The top-level names of a project module (def, class, assignment, import; inside a
    top-level if / try / with too), each with its defining node."""
    import ast

    if relative in MODULE_NAMES:
        return MODULE_NAMES[relative]
    names = {}

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update({n.id: node for n in ast.walk(target)
                                  if isinstance(n, ast.Name)})
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for part in [node.body, getattr(node, "orelse", []),
                             getattr(node, "finalbody", []),
                             *[h.body for h in getattr(node, "handlers", [])]]:
                    visit(part)

    visit(ast.parse((ROOT / relative).read_text()).body)
    MODULE_NAMES[relative] = names
    return names


def class_members(cls, names: dict) -> set[str]:
    """Methods, class attributes and `self.` attributes of a class, with those of its base
    classes defined in the same module."""
    import ast

    members = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(node.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            members.add(node.attr)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            members |= {t.id for t in (node.targets if isinstance(node, ast.Assign)
                                       else [node.target]) if isinstance(t, ast.Name)}
    for base in cls.bases:
        if isinstance(base, ast.Name) and isinstance(names.get(base.id), ast.ClassDef):
            members |= class_members(names[base.id], names)
    return members


def reference_problems(path: Path, lines: list[tuple[int, str]]
                       ) -> list[tuple[str, int, str, str]]:
    """The references in `lines` ((line number, text) of the file `path`) that do not hold, as
    (file, line, reference, what is wrong). What is a reference to the project:

    - Web addresses are dropped first: they are no file of the project.
    - A relative path that goes up a folder is resolved from the citing file's folder: if it
      leaves the project, it fails (nothing may cite a file outside the project); if not, the
      file must exist. Absolute paths are the user's (a data folder, a scratch folder), not
      checked.
    - A path with folders is the project's when its first folder is a source folder (a
      top-level folder holding .py or .md files, not runs/), and must then exist. Any other
      folder is the user's data, a run's output or another codebase's layout (the official
      VirTex code's virtex/config.py), not checked.
    - A bare file name: .md names and the requirements files must exist in the project's root
      or a source folder; .py names too, unless their line cites another codebase (the word
      code, as in the [code] tag; a repository address; a possessive, as in
      UNITER's train_vqa.py). Other .txt and .json names are files a user brings or a run
      writes (a vocabulary, captions, final.json), not checked.
    - A dotted name whose first part is a project module (a .py file in the root) or package
      (shared, tests) must name a module file that exists, then a top-level name of it (def,
      class, assignment or import) and, after a class, a member of that class.
    """
    import ast

    folders = source_folders()
    bare = {p.name for p in ROOT.iterdir() if p.is_file()}
    bare |= {p.name for f in folders for p in (ROOT / f).rglob("*") if p.is_file()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    packages = {f for f in folders if (ROOT / f / "__init__.py").exists()}
    where = str(path.relative_to(ROOT))
    problems = []
    for number, raw in lines:
        text = ADDRESS.sub(" ", raw)
        for match in CLIMB.finditer(text):
            target = (path.parent / match.group(0)).resolve()
            if ROOT != target and ROOT not in target.parents:
                problems.append((where, number, match.group(0), "outside the project"))
        for match in REFERENCED_PATH.finditer(text):
            ref, parts = match.group(1), match.group(1).split("/")
            if ref.startswith("../"):
                target = (path.parent / ref).resolve()
                missing = (ROOT in target.parents) and not target.is_file()
            elif len(parts) > 1:
                missing = parts[0] in folders and not (ROOT / ref).is_file()
            elif ref.endswith(".md") or ref.startswith("requirements") or (
                    ref.endswith(".py") and not OTHER_CODEBASE.search(raw)):
                missing = ref not in bare
            else:
                missing = False
            if missing:
                problems.append((where, number, ref, "no such file in the project"))
        text = REFERENCED_PATH.sub(lambda m: " " * len(m.group(0)), text)
        for match in DOTTED_NAME.finditer(text):
            first, attributes = match.group(1), match.group(2).split(".")[1:]
            if first in packages:
                if not attributes:
                    continue
                module, attributes = f"{first}/{attributes[0]}.py", attributes[1:]
            elif first in modules:
                module = f"{first}.py"
            else:
                continue
            ref = match.group(0)
            if not (ROOT / module).is_file():
                problems.append((where, number, ref, f"no module {module}"))
                continue
            names = module_names(module)
            if attributes and attributes[0] not in names:
                problems.append((where, number, ref, f"{module} defines no {attributes[0]}"))
            elif (len(attributes) > 1 and isinstance(names[attributes[0]], ast.ClassDef)
                  and attributes[1] not in class_members(names[attributes[0]], names)):
                problems.append((where, number, ref, f"{attributes[0]} has no {attributes[1]}"))
    return problems


def test_paths_and_names_named_in_the_project_exist():
    problems = [p for path in cited_files() for p in reference_problems(path, reader_lines(path))]
    assert problems == [], "\n".join(f"{f}:{n}: {ref}: {why}" for f, n, ref, why in problems)


def test_the_reference_check_fails_where_it_should():
    citing = ROOT / "reference" / "notes.md"  # a document of the project (not written)
    bad = ["see `shared/no_such_module.py`", "shared.ot.no_such_solver",
           "coca.CoCa.no_such_method", "the notes in ../../team/notes.md", "as STYLE_GUIDE.md says",
           "tests/test_no_such_file.py", "shared.no_such_module", "train.no_such_function"]
    problems = reference_problems(citing, list(enumerate(bad, 1)))
    assert sorted({n for _, n, _, _ in problems}) == list(range(1, len(bad) + 1)), problems
    good = ["`shared/ot.py`, shared.ot.ipot, coca.CoCa.generate, coca.CoCa.logit_scale, "
            "virtex.Config.tiny, [the results](../RESULTS.md), reference/coca.md",
            "python train.py --data coco:captions.json,images/ --vocab vocab.txt --out runs/x",
            "https://example.org/a/no_such.py, [code] run_no_such.py, w/train/captions.json",
            "the official code's virtex/no_such.py, UNITER's no_such_script.py"]
    assert reference_problems(citing, list(enumerate(good, 1))) == []


def test_train_py_and_the_readme_stay_short():
    """train.py reads top to bottom as one loop of small functions (what is not the loop lives
    in its shared/ module), and the README is read in one sitting."""
    assert len((ROOT / "train.py").read_text().splitlines()) <= 500
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
