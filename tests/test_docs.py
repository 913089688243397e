"""README.md and docs/*.md (issue #25.2): every relative link resolves (anchors included), and every command
in a fenced bash block (and in the CLI's own help examples) names a real subcommand, real options and real
config keys; a script or file a `python`, `pip` or `torchrun` line names exists."""
import argparse
import re
import shlex
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest
import yaml

from encodenet_timm.cli import build_parser
from encodenet_timm.config import ControlsConfig, EncodeNetConfig, describe_keys

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
_FILE = re.compile(r"^[\w.][\w./-]*\.(py|sh|txt)$")  # a script or file named on a command line


def _prose(text: str) -> str:
    """`text` without its fenced code blocks."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> Set[str]:
    slugs, seen = set(), {}
    for line in _prose(path.read_text()).splitlines():
        if line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            slugs.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return slugs


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) < 220
    assert len(PAGES) >= 7  # results, command line, compare, how it works, scaling, failures, ...


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, broken


# ---- commands ---------------------------------------------------------------------------------------------
def _commands(script: str) -> Iterator[List[str]]:
    """The simple commands of a shell script: token lists, split at operators and newlines, without
    redirections, leading VAR=value assignments or comments; ``$(which encodenet)`` reads as ``encodenet``."""
    script = script.replace("\\\n", " ").replace("$(which encodenet)", "encodenet")
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        command, skip = [], False
        for token in list(lexer) + [";"]:
            if skip:
                skip = False
            elif token in _OPERATORS:
                while command and re.match(r"^\w+=", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            elif set(token) <= set("<>&") or re.fullmatch(r"\d[<>]&?", token):
                skip = not token.endswith("&")  # the redirection's file
            else:
                command.append(token)


def _subcommands() -> Dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _check_encodenet(args: List[str], subcommands: Dict[str, argparse.ArgumentParser]) -> List[str]:
    """What is wrong with ``encodenet *args``: an unknown subcommand, option or config key."""
    if not args or args[0] not in subcommands:
        return [f"unknown subcommand in encodenet {' '.join(args)}"]
    parser = subcommands[args[0]]
    options = {o for a in parser._actions for o in a.option_strings}
    keys = set(describe_keys())
    wrong = []
    for before, arg in zip(args, args[1:]):
        if before in ("--set", "-o") and "=" in arg and arg.split("=", 1)[0].replace("-", "_") not in keys:
            wrong.append(f"{before} {arg}: no config key {arg.split('=', 1)[0]!r}")
        if arg.startswith("-") and not re.fullmatch(r"-\d.*", arg) and not arg.startswith("-$"):
            name = arg.split("=", 1)[0]
            name = name.replace("_", "-") if name.startswith("--") else name  # both spellings work
            if name not in options:
                wrong.append(f"encodenet {args[0]} has no option {arg.split('=', 1)[0]}")
    return wrong


def _check(command: List[str], subcommands) -> List[str]:
    name = command[0].rsplit("/", 1)[-1]
    if name == "encodenet":
        return _check_encodenet(command[1:], subcommands)
    if name == "torchrun" and "encodenet" in command:
        return _check_encodenet(command[command.index("encodenet") + 1:], subcommands)
    if name in ("python", "python3", "pip", "torchrun", "bash", "sh"):
        return [f"{' '.join(command)}: no file {token}" for token in command[1:]
                if _FILE.match(token) and not (ROOT / token).exists()]
    return []  # git, cd, shell built-ins: nothing to check


def _bash_blocks() -> List[Tuple[str, str]]:
    """(where, script) of every fenced bash block of the pages, and of the CLI's help examples."""
    blocks = [(page.name, body) for page in PAGES for lang, body in _FENCE.findall(page.read_text())
              if lang in ("bash", "sh", "shell")]
    parser = build_parser()
    examples = [parser.epilog] + [p.epilog or "" for p in _subcommands().values()]
    blocks += [("encodenet --help", "\n".join(line for line in text.splitlines()
                                             if line.strip().startswith(("encodenet", "--", "-"))
                                             or line.startswith("      ")))
               for text in examples]
    return blocks


def test_every_command_in_the_docs_names_real_subcommands_options_and_files():
    subcommands = _subcommands()
    checked, wrong = 0, []
    for where, script in _bash_blocks():
        for command in _commands(script):
            checked += command[0].endswith("encodenet") or "encodenet" in command
            wrong += [f"{where}: {w}" for w in _check(command, subcommands)]
    assert not wrong, wrong
    assert checked >= 30  # the pages' and the help's encodenet lines were all read


def test_the_checker_finds_what_is_wrong():
    subcommands = _subcommands()
    found = [w for line in ("encodenet fitt --out x", "encodenet fit --bach-size 8", "encodenet fit --set nope.lr=1",
                            "python examples/nowhere.py", "OMP_NUM_THREADS=1 python benchmarks/missing.py --x 1")
             for command in _commands(line) for w in _check(command, subcommands)]
    assert len(found) == 5, found
    fine = "encodenet fit --batch_size 8 --transfer.warmup-epochs 2 --set transfer.clip-grad=1 > log.txt 2>&1 &"
    assert [w for command in _commands(fine) for w in _check(command, subcommands)] == []


# ---- the config keys' reference ---------------------------------------------------------------------------
def test_the_command_line_page_describes_every_config_key_as_help_does():
    """docs/command-line.md lists every config key, and every key of compare's --controls.KEY, with --help's
    words; the stage table's defaults are the dataclass defaults."""
    text = (ROOT / "docs" / "command-line.md").read_text()
    rows = {cells[0].strip("`"): cells[1:] for cells in
            (re.split(r"(?<!\\) \| ", line.strip("| \n")) for line in text.splitlines() if line.startswith("| `"))}
    stages = ("baseline", "autoencoder", "transfer", "finetune")
    defaults = EncodeNetConfig()
    wrong = []
    for key, words in describe_keys().items():
        section, _, leaf = key.rpartition(".")
        if section in stages and f"STAGE.{leaf}" in rows:
            value = getattr(getattr(defaults, section), leaf)
            shown = rows[f"STAGE.{leaf}"][1 + stages.index(section)].split(" (")[0]
            if shown != yaml.safe_dump(value).replace("\n...", "").strip():
                wrong.append(f"{key}: the page says {shown}, the default is {value}")
        elif key not in rows:
            wrong.append(f"{key}: not on the page")
        elif rows[key][0].replace("\\|", "|") != words:
            wrong.append(f"{key}: the page says {rows[key][0]!r}, --help says {words!r}")
    for key, words in describe_keys(ControlsConfig(), "controls.").items():  # compare's --controls.KEY
        if key not in rows:
            wrong.append(f"{key}: not on the page")
        elif rows[key][0].replace("\\|", "|") != words:
            wrong.append(f"{key}: the page says {rows[key][0]!r}, compare --help says {words!r}")
    assert not wrong, wrong
