"""The shell blocks of the docs, as a reader would copy them.

A block is a fenced ```console (commands are the ``$ `` lines, the rest is their output; an
unlabelled block with ``$ `` lines is one too), ```bash / ```sh (every line a command) or ```python
block. An HTML comment on the line before a block says
what the docs guard (tests/test_docs.py) does with it: ``<!-- guard: run -->`` runs it, in order
with the other run blocks of its page; ``<!-- guard: skip: REASON -->`` leaves it out (it needs Macs,
ssh or the hub). Every other block is still checked: its ``mlx-serving`` commands must parse and
the repository files it names must exist.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*guard:\s*(run|skip)\b:?\s*(.*?)\s*-->\s*$")
SHELL = ("console", "bash", "sh", "shell")


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    lines: list[str]
    mark: str | None = None  # "run", "skip" or None
    reason: str = ""
    commands: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _incomplete(command: str) -> bool:
    """Whether the shell would wait for more lines (an open ``for ... do``, quote or pipe)."""
    import subprocess

    res = subprocess.run(["bash", "-n"], input=command + "\n", capture_output=True, text=True)
    return res.returncode != 0 and "unexpected end of file" in res.stderr


def _commands(lang: str, lines: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for raw in lines:
        if lang == "console":
            if pending:
                text = raw.lstrip()
            elif raw.startswith("$ "):
                text = raw[2:]
            elif out and _incomplete(out[-1]):  # the body of a loop typed at the prompt
                out[-1] += "\n" + raw
                continue
            else:
                continue
        elif lang in SHELL:
            text = raw.strip()
            if not pending and (not text or text.startswith("#")):
                continue
        else:
            return []
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1].rstrip() + " "
            continue
        out.append((pending + text).strip())
        pending = ""
    return out


def blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(text):
        m = FENCE.match(text[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(text) and not text[j].startswith("```"):
            j += 1
        if not lang and any(x.startswith("$ ") for x in text[start + 1:j]):
            lang = "console"  # an unlabelled block typed at a prompt
        prev = next((text[k] for k in range(start - 1, -1, -1) if text[k].strip()), "")
        mark = MARK.match(prev.strip())
        b = Block(doc, start + 1, lang, text[start + 1:j], mark.group(1) if mark else None,
                  mark.group(2) if mark else "")
        b.commands = _commands(lang, b.lines)
        out.append(b)
        i = j + 1
    return out


def segments(command: str) -> list[list[str]]:
    """A command line's simple commands (split at ``&&``, ``||``, ``;`` and ``|``), each as argv with
    leading ``VAR=value`` assignments dropped; a line the shell lexer cannot split gives none."""
    try:
        lex = shlex.shlex(command, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        tokens = list(lex)
    except ValueError:
        return []
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in (";", "&&", "||", "|", "&"):
            out.append([])
        else:
            out[-1].append(t)
    result = []
    for argv in out:
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            result.append(argv)
    return result
