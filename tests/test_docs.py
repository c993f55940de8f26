"""README.md and docs/*.md are tested like code.

- Every fenced `python` block runs on CPU, in a fresh namespace and an empty working directory. The line before a
  block may direct how (an HTML comment, invisible on the rendered page):
    <!-- example: skip, REASON -->             not run; the test is skipped with the reason (pytest -ra lists them)
    <!-- example: fixture NAME [NAME ...] -->  run with the names, and the files, that these fixtures provide
    <!-- example: signature of MODULE.NAME --> a `def` whose parameters, kinds and defaults must be the real ones
- Every `make` target and `python -m` module named exists, and every `--option` of a documented command is one that
  the module's `--help` lists.
- Every relative link and anchor resolves; every repository path named in inline code exists.
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from importlib import import_module, util
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DIRECTIVE = re.compile(r"<!--\s*example:\s*(.*?)\s*-->", re.S)
SHELL = {"bash", "sh", "shell", "console"}
PROJECT_MODULES = ("epa_kernels", "training", "benchmarks")
REPO_PATH = re.compile(r"(?:epa_kernels|training|benchmarks|tests|csrc|docs|\.ci)/\S*|"
                       r"(?:Makefile|setup\.py|pyproject\.toml|README\.md)")
SEED = 0


@cache
def tokens(path: Path):
    return MarkdownIt("commonmark").enable("table").parse(path.read_text())


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    directive: str | None  # the text after "example:", or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    found, previous = [], None
    for token in tokens(path):
        if token.type == "fence":
            directive = None
            if previous is not None and previous.type == "html_block" and previous.map[1] == token.map[0]:
                match = DIRECTIVE.fullmatch(previous.content.strip())
                directive = match.group(1) if match else None
            language = token.info.split()[0] if token.info.strip() else ""
            found.append(Block(path, token.map[0] + 1, language, token.content, directive))
        previous = token
    return found


BLOCKS = [block for path in DOCS for block in fenced_blocks(path)]
PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python"]


def directives() -> list[tuple[str, int, str]]:
    """(file, line, text) of every example directive, attached to a block or not."""
    found = []
    for path in DOCS:
        for token in tokens(path):
            if token.type == "html_block":
                for match in DIRECTIVE.finditer(token.content):
                    found.append((str(path.relative_to(ROOT)), token.map[0] + 1, match.group(1)))
    return found


# -- fixtures: what an example may assume ------------------------------------------------------------------------

def preference_data() -> dict:
    """`prefs.jsonl` (8 prompts in TRL's multi-negative format) in the working directory, a tiny random Llama as
    `causal_lm`, its byte-level `tokenizer`, and `device`."""
    from tiny_models import tiny_causal_lm, tiny_tokenizer

    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
             "rejected": [f"It is {2 * i + 1}.", "I do not know."]} for i in range(8)]
    Path("prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"causal_lm": tiny_causal_lm("llama"), "tokenizer": tiny_tokenizer(), "device": torch.device("cpu")}


def classifier_pool() -> dict:
    """A tiny random BERT sequence classifier as `model` (3 classes), a tokenized `pool` of 160 texts and
    `labeled`, 12 of its indices."""
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(5, 64, (160, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::3, 8:] = 0
    return {"model": model, "pool": {"input_ids": input_ids, "attention_mask": attention_mask},
            "labeled": list(range(0, 120, 10))}


def mlm_pool() -> dict:
    """A tiny random BertForMaskedLM as `mlm`, a `tokenizer` naming its special tokens ([PAD] 0, [CLS] 1,
    [SEP] 2, [MASK] 3) and a tokenized `pool` of 160 texts written the way that tokenizer writes them (ids < 64,
    so `classifier_pool`'s model reads it too)."""
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    mlm = transformers.BertForMaskedLM(config).eval()
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", *(f"w{i}" for i in range(59))]
    tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    generator = torch.Generator().manual_seed(SEED)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 59, (int(n),), generator=generator))
             for n in torch.randint(4, 14, (160,), generator=generator)]
    pool = tokenizer(texts, padding=True, return_tensors="pt")
    return {"mlm": mlm, "tokenizer": tokenizer, "pool": dict(pool)}


def causal_lm_prompts() -> dict:
    """A tiny random Llama as `model`, its `tokenizer`, and 80 `prompts`."""
    from tiny_models import tiny_causal_lm, tiny_tokenizer

    return {"model": tiny_causal_lm("llama"), "tokenizer": tiny_tokenizer(),
            "prompts": [f"Tell me about the number {i}." for i in range(80)]}


def saved_model() -> dict:
    """A tiny random Llama saved with its tokenizer in tiny-model/, and prefs.jsonl (TRL's multi-negative
    format), in the working directory."""
    from tiny_models import tiny_causal_lm, tiny_tokenizer

    tiny_causal_lm("llama_tied", seed=SEED).save_pretrained("tiny-model")
    tiny_tokenizer().save_pretrained("tiny-model")
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
             "rejected": [f"It is {2 * i + 1}.", "I do not know."]} for i in range(8)]
    Path("prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {}


FIXTURES = {fixture.__name__: fixture for fixture in (preference_data, classifier_pool, mlm_pool, causal_lm_prompts,
                                                      saved_model)}


# -- the examples -----------------------------------------------------------------------------------------------

def parse_directive(block: Block) -> tuple[str, str]:
    if block.directive is None:
        return "run", ""
    kind, _, rest = block.directive.partition(" ")
    kind = kind.rstrip(",")
    if kind not in ("skip", "fixture", "signature"):
        raise ValueError(f"{block.where}: unknown example directive {block.directive!r} "
                         "(skip, REASON | fixture NAME ... | signature of NAME)")
    if kind == "skip" and not rest.strip():
        raise ValueError(f"{block.where}: a skipped example needs its reason")
    return kind, rest.strip()


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[block.where for block in PYTHON_BLOCKS])
def test_python_example(block, tmp_path, monkeypatch):
    kind, detail = parse_directive(block)
    if kind == "skip":
        pytest.skip(f"{block.where}: {detail}")
    if kind == "signature":
        check_signature(block, detail)
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))  # tiny_models, for the fixtures
    torch.manual_seed(SEED)
    print(f"seed {SEED}; running {block.where}")
    namespace = {"__name__": "__example__"}
    for name in detail.split() if kind == "fixture" else ():
        if name not in FIXTURES:
            raise ValueError(f"{block.where}: unknown fixture {name!r}; known: {', '.join(FIXTURES)}")
        namespace.update(FIXTURES[name]())
    exec(compile(block.code, block.where, "exec"), namespace)


def check_signature(block: Block, detail: str) -> None:
    """The block's `def` lists the real function's parameters: the same names, in order, of the same kinds, with
    the same defaults."""
    target = detail.removeprefix("of ").strip()
    module, _, name = target.rpartition(".")
    real = inspect.signature(getattr(import_module(module), name))
    (function,) = ast.parse(block.code).body
    assert isinstance(function, ast.FunctionDef) and function.name == name, f"{block.where}: not `def {name}(...)`"
    args = function.args
    documented = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in args.args]
    documented += [(args.vararg.arg, inspect.Parameter.VAR_POSITIONAL)] if args.vararg else []
    documented += [(a.arg, inspect.Parameter.KEYWORD_ONLY) for a in args.kwonlyargs]
    documented += [(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD)] if args.kwarg else []
    assert documented == [(p.name, p.kind) for p in real.parameters.values()], (
        f"{block.where}: documented parameters differ from {target}{real}")
    defaults = dict(zip([a.arg for a in args.args][len(args.args) - len(args.defaults):], args.defaults, strict=True))
    defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None})
    for parameter in real.parameters.values():
        shown = defaults.get(parameter.name)
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if parameter.default is inspect.Parameter.empty:
            assert shown is None, f"{block.where}: {parameter.name} has no default in {target}"
        else:
            assert shown is not None, f"{block.where}: {parameter.name}'s default is not shown"
            assert ast.literal_eval(shown) == parameter.default, (
                f"{block.where}: {parameter.name}={ast.unparse(shown)}, but {target} has {parameter.default!r}")


def test_every_directive_is_attached_and_known():
    attached = {(block.where, block.directive) for block in PYTHON_BLOCKS if block.directive is not None}
    for file, line, text in directives():
        fence = next((b for b in PYTHON_BLOCKS if str(b.path.relative_to(ROOT)) == file and b.directive == text
                      and b.line > line), None)
        assert fence is not None and (fence.where, text) in attached, (
            f"{file}:{line}: directive {text!r} is not on the line just before a python block")
        parse_directive(fence)


def test_examples_exist_on_every_page():
    """Each page of the manual and the README shows runnable code (a run-or-skip inventory is in pytest -ra)."""
    for path in DOCS:
        assert any(b.path == path and b.language in {"python", *SHELL} for b in BLOCKS), f"{path.name}: no example"


# -- commands ---------------------------------------------------------------------------------------------------

def shell_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command in the docs' shell blocks (continuation lines joined, comments dropped) and
    inline code spans."""
    found = []
    for block in BLOCKS:
        if block.language in SHELL:
            text = re.sub(r"\\\n", " ", block.code)
            for offset, line in enumerate(text.splitlines()):
                found.append((f"{block.where}+{offset}", line))
    for path in DOCS:
        for token in tokens(path):
            for child in token.children or ():
                if child.type == "code_inline" and re.match(r"(make|python|accelerate|torchrun)\b", child.content):
                    found.append((f"{path.relative_to(ROOT)}:{token.map[0] + 1}", child.content))
    commands = []
    for where, line in found:
        line = line.split(" #", 1)[0].strip()
        if not line:
            continue
        try:
            argv = shlex.split(line)
        except ValueError as error:
            raise AssertionError(f"{where}: cannot read the command {line!r}: {error}") from None
        commands.append((where, argv))
    return commands


def module_commands() -> dict[str, list[tuple[str, list[str]]]]:
    """module → [(where, its arguments)] for every `python -m` / `-m` command."""
    found = {}
    for where, argv in shell_commands():
        for i, word in enumerate(argv[:-1]):
            if word == "-m" and (i == 0 or argv[i - 1] != "pytest"):
                found.setdefault(argv[i + 1], []).append((where, argv[i + 2:]))
    return found


def make_targets() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    targets = {name for line in re.findall(r"^([\w. -]+?)\s*:(?!=)", text, re.M) for name in line.split()}
    variables = set(re.findall(r"^([A-Z_]+)\s*[:?+]?=", text, re.M))
    return targets, variables


def test_every_make_command_names_a_target_and_its_variables():
    targets, variables = make_targets()
    checked = 0
    for where, argv in shell_commands():
        if argv[0] != "make":
            continue
        for word in argv[1:]:
            if "=" in word:
                assert word.split("=", 1)[0] in variables, f"{where}: the Makefile has no variable {word}"
            else:
                assert word in targets, f"{where}: the Makefile has no target {word!r}"
        checked += 1
    assert checked >= 4, "the README's quick start names `make bench` and `make test`"


def test_every_python_module_exists():
    for module, uses in module_commands().items():
        assert util.find_spec(module) is not None, f"{uses[0][0]}: no module {module!r} (python -m {module})"


def option_problems(module: str, help_text: str, uses: list[tuple[str, list[str]]]) -> list[str]:
    return [f"{where}: python -m {module} takes no option {option}" for where, argv in uses
            for option in sorted({word.split("=", 1)[0] for word in argv if word.startswith("--")})
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text)]


PROGRAMS = sorted(m for m in module_commands() if m.split(".")[0] in PROJECT_MODULES)


@pytest.mark.parametrize("module", PROGRAMS)
def test_every_documented_option_is_one_the_program_takes(module):
    """`python -m MODULE --help` (its own process: some programs re-execute themselves) lists every `--option` the
    docs pass it."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and "usage" in done.stdout.lower(), (
        f"python -m {module} --help failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    problems = option_problems(module, done.stdout, module_commands()[module])
    assert not problems, "\n".join(problems)


# -- links and paths --------------------------------------------------------------------------------------------

def github_slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation and symbols dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, … as on GitHub."""
    found, counts = set(), {}
    for token, inline in pairwise(tokens(path)):
        if token.type == "heading_open":
            slug = github_slug("".join(c.content for c in inline.children if c.type in ("text", "code_inline")))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def link_problems(path: Path) -> list[str]:
    problems = []
    for token in tokens(path):
        for child in token.children or ():
            target = child.attrs.get("href") if child.type == "link_open" else (
                child.attrs.get("src") if child.type == "image" else None)
            if not target or re.match(r"[a-z][a-z0-9+.-]*:", str(target)):  # none, or a URL (not checked offline)
                continue
            where = f"{path.name}:{token.map[0] + 1}"
            file, _, anchor = str(target).partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                problems.append(f"{where}: link to {target!r}: no such file")
            elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
                problems.append(f"{where}: link to {target!r}: no heading #{anchor} in {resolved.name}")
    return problems


def braces(text: str) -> list[str]:
    """Shell brace expansion, one {a,b} group at a time."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if not match:
        return [text]
    return [expanded for choice in match.group(1).split(",")
            for expanded in braces(text[:match.start()] + choice + text[match.end():])]


def path_problems(path: Path) -> list[str]:
    """Repository paths in inline code (`benchmarks/results/…`, `epa_kernels/ops/`) that do not exist."""
    problems = []
    for token in tokens(path):
        for child in token.children or ():
            if child.type != "code_inline" or not REPO_PATH.fullmatch(child.content) or "…" in child.content:
                continue
            for name in braces(child.content):
                matches = list(ROOT.glob(name.rstrip("/"))) if "*" in name else [ROOT / name]
                if not any(m.exists() for m in matches):
                    problems.append(f"{path.name}:{token.map[0] + 1}: `{child.content}`: {name} does not exist")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_relative_link_and_anchor_resolves(path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_repository_path_named_exists(path):
    problems = path_problems(path)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A wrong signature, an option a program does not take, a missing file, a missing anchor and a missing
    repository path are each reported."""
    wrong = Block(ROOT / "README.md", 1, "python", "def linear_logprobs(hidden, weight, targets, bias=None, *, "
                  "ignore_index=-1): ...\n", "signature of epa_kernels.linear_logprobs")
    with pytest.raises(AssertionError, match="documented parameters differ"):
        check_signature(wrong, "of epa_kernels.linear_logprobs")
    assert option_problems("m", "usage: m [--beta BETA]", [("x.md:1", ["--beta", "0.1", "--betas=2"])]) == [
        "x.md:1: python -m m takes no option --betas"]
    page = tmp_path / "page.md"
    page.write_text("# A `b`: c\n\n[ok](#a-b-c) [file](missing.md) [anchor](#nowhere) `benchmarks/nowhere.py` "
                    "`benchmarks/{run,plots}.py`\n")
    assert link_problems(page) == ["page.md:3: link to 'missing.md': no such file",
                                   "page.md:3: link to '#nowhere': no heading #nowhere in page.md"]
    assert path_problems(page) == ["page.md:3: `benchmarks/nowhere.py`: benchmarks/nowhere.py does not exist"]
    assert github_slug("Long context in tight memory: against TRL's `DPOTrainer`") == (
        "long-context-in-tight-memory-against-trls-dpotrainer")
