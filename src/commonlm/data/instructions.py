"""An instruction set built offline from this Python's standard library: chat data with no download.

Every machine that runs CommonLM has the standard library, and its docstrings are written answers to "what
does this do?". So the chat quickstart's fine-tuning data is made from them: a user asks about a module,
function, class or method in one of many phrasings, and the assistant answers with the docstring's first
paragraph. Follow-up turns ask only what the library itself can answer: the arguments (from the signature),
an example (only where the docstring has one), more detail (its next paragraph), what a module or class
provides (its members' one-line summaries), where it comes from, or about a sibling in the same module.

The modules are imported (C modules have no source to parse) except those with side effects on import
(`antigravity` opens a browser, `this` prints), GUI and platform-specific ones, and the deprecated ones
(PEP 594: they warn on import and are leaving the library). They are imported and read in a fresh
interpreter (`library`): the caller stays free of ~300 modules, and what the caller has patched cannot leak
in (torch replaces `inspect.getfile`, pytest `pdb.set_trace`). Private names, empty docstrings and docstrings
over MAX_DOC characters (manuals, not answers) are skipped, and so are defaults whose repr names a memory
address, so the set is a pure function of the Python version and the seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import io
import json
import pkgutil
import random
import re
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from types import ModuleType

from commonlm.errors import UserError

# side effects on import, GUI, the documentation's own data, and platform halves that os/os.path present
SIDE_EFFECTS = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline", "pydoc_data",
                "encodings", "lib2to3", "ensurepip", "venv", "posix", "nt", "posixpath", "ntpath", "nturl2path",
                "genericpath", "msvcrt", "winreg", "winsound", "test", "tests", "idle_test"}
DEPRECATED = {"aifc", "asynchat", "asyncore", "audioop", "cgi", "cgitb", "chunk", "crypt", "distutils", "imghdr",
              "imp", "mailcap", "msilib", "nis", "nntplib", "ossaudiodev", "pipes", "smtpd", "sndhdr", "spwd",
              "sre_compile", "sre_constants", "sre_parse", "sunau", "telnetlib", "uu", "xdrlib"}
EXTRA_MODULES = ["os.path"]  # not a package's submodule (it is posixpath), but what everybody imports
MAX_DOC = 20_000  # characters: a longer docstring is a manual, not an answer
SUMMARY_CHARS = (20, 600)  # an answer paragraph shorter than this says nothing, longer is too long for one turn
MAX_PARAMS = 8
MAX_MEMBERS = 6
MAX_EXAMPLE_LINES = 10
COMMON_SUMMARY = 5  # a summary shared by more entries than this is boilerplate ("Initialize self.")
SYSTEM = "You are a helpful assistant. You answer questions about the Python standard library."
RST_ROLE = re.compile(r":\w+:`~?([^`]+)`")  # :mod:`json` in a docstring is `json` in a chat
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*-+>.*)?$")  # an old-style C docstring's first line
LEADING_NAME = re.compile(r"^[\w.]+(\(.*?\))?\s+--\s+(?=\w)")  # "D.count(value) -- return ...", "codecs -- ..."
NOT_PROSE = re.compile(r"={3,}|-{3,}| \| ")  # reST headings and rules, grammar alternatives


@dataclass(frozen=True)
class Entry:
    """One thing a user can ask about, with the answers its documentation gives."""

    name: str  # as it is written in code: "json.dumps", "len", "str.split", "collections"
    module: str  # the module to import it from ("builtins" for built-ins)
    kind: str  # "module" | "function" | "class" | "method"
    summary: str  # the docstring's first paragraph, on one line
    more: str | None = None  # its next paragraph, where that is plain prose
    call: str | None = None  # how to call it: "json.dumps(obj, *, skipkeys=False, ...)"
    params: tuple[str, ...] = ()  # one description per parameter
    example: str | None = None  # the docstring's first >>> example
    members: tuple[tuple[str, str], ...] = ()  # a module's: (name, one sentence) of some public members


# ---------------------------------------------------------------------------------------------------
# The library


@functools.lru_cache(maxsize=1)
def library() -> tuple[Entry, ...]:
    """`entries(stdlib_modules())` as a fresh interpreter sees them (this module run as a script); read once per
    process (a few seconds: the chat quickstart asks twice, to size the conversations, then to build them)."""
    proc = subprocess.run([sys.executable, "-m", __name__], capture_output=True, text=True)
    try:
        found = json.loads(proc.stdout) if proc.returncode == 0 else None
    except ValueError:
        found = None
    if found is None:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"instructions: reading the standard library in a fresh {sys.executable} failed ({why})")
    return tuple(Entry(**{**e, "params": tuple(e["params"]), "members": tuple(map(tuple, e["members"]))})
                 for e in found)


def stdlib_modules() -> list[tuple[str, ModuleType]]:
    """(import name, module) of every public standard library module that imports cleanly here, packages'
    public submodules included, sorted by name."""
    names = sorted(n for n in sys.stdlib_module_names if _public(n)) + EXTRA_MODULES
    found: dict[str, ModuleType] = {}
    while names:
        name = names.pop()
        if name in found:
            continue
        module = _quiet_import(name)
        if module is None:
            continue
        found[name] = module
        if hasattr(module, "__path__"):
            names += [f"{name}.{m.name}" for m in pkgutil.iter_modules(module.__path__) if _public(m.name)]
    return sorted(found.items())


def _public(name: str) -> bool:
    parts = name.split(".")
    return not any(p.startswith("_") or p in SIDE_EFFECTS or p in DEPRECATED for p in parts)


def _quiet_import(name: str) -> ModuleType | None:
    """The module, or None where it does not import on this machine (another OS's, a missing C library);
    whatever it prints or warns on import is swallowed."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, and the odd OSError or AttributeError of a platform-specific module
            return None


def entries(modules: list[tuple[str, ModuleType]]) -> list[Entry]:
    """Every documented public module, function, class and method of `modules`, each object once (under the
    first module, in name order, that it belongs to), boilerplate summaries dropped (but for built-ins: many
    mappings share `dict.get`'s)."""
    out, seen = [], set()
    for name, module in modules:
        members = []
        for attr, obj in _public_members(name, module):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            qualified = attr if name == "builtins" else f"{name}.{attr}"
            if inspect.isclass(obj):  # dict's own docstring is a table, but dict.get's is an answer
                out += _methods(qualified, name, obj)
            entry = _entry(qualified, name, obj)
            if entry is not None:
                out.append(entry)
                members.append((attr, _first_sentence(entry.summary)))
        if name != "builtins":
            entry = _entry(name, name, module, tuple((m, s) for m, s in members if s)[:MAX_MEMBERS])
            if entry is not None:
                out.append(entry)
    counts: dict[str, int] = {}
    for e in out:
        counts[e.summary] = counts.get(e.summary, 0) + 1
    return [e for e in out if counts[e.summary] <= COMMON_SUMMARY or e.module == "builtins"]


def _public_members(name: str, module: ModuleType) -> list[tuple[str, object]]:
    """Public functions and classes defined in `module`, in its submodules, or in the private or platform
    module behind it (`os.getcwd` is posix's, `json.JSONDecoder` json.decoder's), in name order."""
    names = getattr(module, "__all__", None)
    names = names if isinstance(names, (list, tuple)) else list(vars(module))
    out = []
    for attr in sorted(set(n for n in names if isinstance(n, str) and not n.startswith("_"))):
        obj = getattr(module, attr, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        home = getattr(obj, "__module__", None) or ""
        behind = home.startswith("_") and home.split(".")[0] in sys.stdlib_module_names  # not _pytest's
        if home == module.__name__ or home.startswith(module.__name__ + ".") or behind or home in ("posix", "nt") \
                or name == "os.path":
            out.append((attr, obj))
    return out


def _methods(qualified: str, module: str, cls: type) -> list[Entry]:
    out = []
    for attr in sorted(a for a in vars(cls) if not a.startswith("_")):
        raw = vars(cls)[attr]
        if not (inspect.isroutine(raw) or isinstance(raw, (classmethod, staticmethod))):
            continue
        entry = _entry(f"{qualified}.{attr}", module, getattr(cls, attr, None), method_of=qualified)
        if entry is not None:
            out.append(entry)
    return out


def _entry(name: str, module: str, obj: object, members: tuple[tuple[str, str], ...] = (),
           method_of: str | None = None) -> Entry | None:
    doc = obj.__doc__ if inspect.ismodule(obj) else _own_doc(obj)
    if not isinstance(doc, str) or not doc.strip() or len(doc) > MAX_DOC:
        return None
    text = inspect.cleandoc(doc)
    while SIGNATURE_LINE.match(text.partition("\n")[0].strip()):  # "newwin(nlines, ncols)" above the text
        text = text.partition("\n")[2]
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        return None
    summary = _prose(paragraphs[0])
    if summary is None:
        return None
    kind = "module" if inspect.ismodule(obj) else "class" if inspect.isclass(obj) else \
        "method" if method_of else "function"
    call, params = _signature(name, obj, method_of) if kind != "module" else (None, ())
    more = _prose(paragraphs[1]) if len(paragraphs) > 1 else None
    return Entry(name, module, kind, summary, more, call, params, _example(doc), members)


def _own_doc(obj: object) -> str | None:
    """The object's own docstring: a class without one would show its base's ("Initialize self...")."""
    if inspect.isclass(obj):
        return vars(obj).get("__doc__")
    return getattr(obj, "__doc__", None)


def _prose(paragraph: str) -> str | None:
    """A paragraph of plain prose on one line, or None for a table, list, example or one too short or long."""
    lines = paragraph.splitlines()
    if any(line[:1].isspace() or line.lstrip().startswith((">>>", "- ", "* ", "|", "+-")) for line in lines):
        return None
    text = LEADING_NAME.sub("", RST_ROLE.sub(r"`\1`", " ".join(paragraph.split())).replace("``", "`"))
    text = text[:1].upper() + text[1:]
    if text.endswith(":") or NOT_PROSE.search(text):  # it introduces what was left out, or is no prose
        return None
    return text if SUMMARY_CHARS[0] <= len(text) <= SUMMARY_CHARS[1] else None


def _first_sentence(text: str) -> str:
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= 120 and not sentence.endswith(":") else ""


def _example(doc: str) -> str | None:
    """The docstring's first run of >>> lines with their output, if short."""
    lines = inspect.cleandoc(doc).splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith(">>> ")), None)
    if start is None:
        return None
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    text = textwrap.dedent("\n".join(block))
    return text if len(block) <= MAX_EXAMPLE_LINES and len(text) <= 400 else None


def _signature(name: str, obj: object, method_of: str | None) -> tuple[str | None, tuple[str, ...]]:
    """("name(a, b=1)", parameter descriptions), or (None, ()) where there is no readable signature."""
    try:
        sig = inspect.signature(obj)
    except Exception:  # many C classes have none; a few C text signatures name constants that are not there
        return None, ()
    parameters = list(sig.parameters.values())
    if method_of and parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in parameters]
    described = []
    for p in parameters:
        default = "" if p.default is inspect.Parameter.empty else repr(p.default)
        if " at 0x" in default or len(default) > 40:  # an address differs in every process
            return None, ()
        described.append(_describe(p, default))
    if inspect.isclass(obj) and [p.kind for p in parameters] == [inspect.Parameter.VAR_POSITIONAL,
                                                                  inspect.Parameter.VAR_KEYWORD]:
        return None, ()  # object's (*args, **kwargs): says nothing
    shown = sig.replace(parameters=parameters, return_annotation=inspect.Signature.empty)
    call = f".{name.rsplit('.', 1)[1]}{shown}" if method_of else f"{name}{shown}"
    if len(call) > 200:
        return None, ()
    return call, tuple(described)


def _describe(p: inspect.Parameter, default: str) -> str:
    kinds = {p.POSITIONAL_ONLY: "positional only, ", p.KEYWORD_ONLY: "keyword only, "}
    if p.kind == p.VAR_POSITIONAL:
        return f"`*{p.name}`: any number of further positional arguments"
    if p.kind == p.VAR_KEYWORD:
        return f"`**{p.name}`: any further keyword arguments"
    return f"`{p.name}`: {kinds.get(p.kind, '')}" + (f"optional, default `{default}`" if default else "required")


# ---------------------------------------------------------------------------------------------------
# Conversations

ASK = {
    "function": ["What does `{name}` do?", "What does {name} do?", "Explain `{name}`.", "What is {name} for?",
                 "Tell me about `{name}` in Python.", "How does `{name}` work?",
                 "I saw `{name}` in some code. What is it?", "In Python, what is `{name}`?",
                 "Can you explain what {name} does?", "what does {name} do", "Briefly, what is `{name}`?"],
    "class": ["What is `{name}`?", "What is the {name} class?", "Explain the `{name}` class.",
              "What is {name} used for?", "Tell me about `{name}`.", "what is {name}"],
    "module": ["What is the `{name}` module for?", "What does the {name} module do?",
               "Tell me about Python's `{name}` module.", "What is `{name}` in the standard library?",
               "Why would I import {name}?", "what is the {name} module"],
}
ASK["method"] = ASK["function"]
FOLLOW = {
    "args": ["What arguments does it take?", "Which parameters does it accept?", "How do I call it?",
             "What is its signature?", "what args does it take?"],
    "example": ["Can you give an example?", "Show me an example.", "Is there an example of using it?",
                "example please"],
    "more": ["Tell me more.", "Can you go into more detail?", "Anything else I should know?", "More details, please."],
    "members": ["What does it provide?", "What are the main things in it?", "What can I use from it?"],
    "where": ["Which module is it in?", "How do I import it?", "Where does it come from?"],
    "sibling": ["And what about `{name}`?", "What about {name}?", "And `{name}`?", "How about {name}?"],
}
FOLLOW_COUNTS, FOLLOW_WEIGHTS = [0, 1, 2, 3], [25, 35, 25, 15]


def build_instructions(seed: int = 0, limit: int = 4000, max_chars: int = 1200) -> list[dict]:
    """Up to `limit` conversations ({"messages": [...]}, the jsonl records `prepare_chat` reads) about this
    Python's standard library, the same for the same seed: about every module, function and class first,
    methods fill the rest. Follow-ups are added only while the whole
    conversation stays within `max_chars` characters (what fits the model's context)."""
    all_entries = library()
    rng = random.Random(seed)
    first = [e for e in all_entries if e.kind != "method"]  # modules, functions and classes, then methods
    methods = [e for e in all_entries if e.kind == "method"]
    chosen = first + methods if len(all_entries) <= limit else \
        rng.sample(first, min(limit, len(first))) + rng.sample(methods, max(0, limit - len(first)))
    rng.shuffle(chosen)
    by_module: dict[str, list[Entry]] = {}
    for e in all_entries:
        if e.kind in ("function", "class"):
            by_module.setdefault(e.module, []).append(e)
    records = [conversation(e, rng, by_module.get(e.module, []), max_chars) for e in chosen]
    return [{"messages": m} for m in records if m]


def conversation(entry: Entry, rng: random.Random, siblings: list[Entry], max_chars: int) -> list[dict[str, str]]:
    """One conversation about `entry`: a question in a random phrasing, its answer, then follow-ups."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": rng.choice(ASK[entry.kind]).format(name=entry.name)},
                 {"role": "assistant", "content": _introduce(entry)}]
    if _chars(messages) > max_chars:
        return []
    subject = entry
    for _ in range(rng.choices(FOLLOW_COUNTS, FOLLOW_WEIGHTS)[0]):
        options = [k for k in ("args", "example", "more", "members", "where", "sibling") if _can(k, subject, siblings)]
        if not options:
            break
        kind = rng.choice(options)
        if kind == "sibling":
            other = rng.choice([s for s in siblings if s is not subject])
            turn = [rng.choice(FOLLOW[kind]).format(name=other.name), _introduce(other)]
        else:
            other, turn = subject, [rng.choice(FOLLOW[kind]), _answer(kind, subject)]
        added = [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        if _chars(messages + added) > max_chars:
            break
        messages, subject = messages + added, other
    return messages


def _chars(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def _can(kind: str, e: Entry, siblings: list[Entry]) -> bool:
    return {"args": e.call is not None, "example": e.example is not None, "more": e.more is not None,
            "members": bool(e.members), "where": e.kind != "module",
            "sibling": any(s is not e for s in siblings)}[kind]


def _introduce(e: Entry) -> str:
    if e.kind == "module":
        return f"`{e.name}` is a standard library module. {e.summary}"
    if e.kind == "method":
        return f"`{e.name}` is a method of `{e.name.rsplit('.', 1)[0]}`. {e.summary}"
    where = "a built-in" if e.module == "builtins" else f"a {e.kind} in the `{e.module}` module"
    return f"`{e.name}` is {where}{' function' if e.module == 'builtins' and e.kind == 'function' else ''}. " \
           f"{e.summary}"


def _answer(kind: str, e: Entry) -> str:
    if kind == "args":
        how = f"Call it on a `{e.name.rsplit('.', 1)[0]}` object as `{e.call}`." if e.kind == "method" else \
            f"{'Create one' if e.kind == 'class' else 'Call it'} as `{e.call}`."
        if not e.params:
            return how + " It takes no arguments."
        lines = [f"- {p}" for p in e.params[:MAX_PARAMS]]
        if len(e.params) > MAX_PARAMS:
            lines.append(f"- and {len(e.params) - MAX_PARAMS} more")
        return how + " Its parameters:\n" + "\n".join(lines)
    if kind == "example":
        return f"Here is the example from its documentation:\n```python\n{e.example}\n```"
    if kind == "more":
        return e.more
    if kind == "members":
        return f"Some of what the `{e.name}` module provides:\n" + "\n".join(f"- `{m}`: {s}" for m, s in e.members)
    short = e.name.rsplit(".", 1)[-1]
    if e.module == "builtins":
        return f"`{e.name}` is a built-in: it is always available, with no import."
    if e.kind == "method":
        return f"It is a method of `{e.name.rsplit('.', 1)[0]}` objects, from the `{e.module}` module."
    return f"It is in the `{e.module}` module: `import {e.module}` and use `{e.name}`, or " \
           f"`from {e.module} import {short}`."


if __name__ == "__main__":  # what `library` runs: the entries as JSON on stdout
    print(json.dumps([dataclasses.asdict(e) for e in entries(stdlib_modules())]))
