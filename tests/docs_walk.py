"""The docs walk: every command README.md, docs/*.md and slurm/README.md show, run as written.

    python3 tests/docs_walk.py [--repo PATH] [--keep DIR] [--only FILE ...] [--slow]
                               [--timeout S] [--list]

A script, not a test (pytest does not collect it: no ``test_`` prefix) and not part of
``make test``: it takes about 6 minutes on an idle 2-core machine, 10 beside a test run
(``make demo`` is 2-3 of them; ``--slow`` adds ``make test``'s 15-20). Standard library
only: any Python 3 runs it.

What it does, in order:

1. ``git clone`` the repository at ``--repo`` (default: the checkout this file is in) into a
   temporary directory. It clones HEAD: commit first, or the walk checks the previous commit
   (it warns when the checkout has uncommitted changes).
2. ``make demo`` in the clone: a fresh ``.venv`` from the CPU wheel, then the demo run
   (about 2 minutes).
3. Every fenced ```bash / ```sh / ```shell block of the walked files, in this order:
   README.md; docs/models.md, docs/parallelism.md, docs/checkpoints.md, docs/export.md,
   docs/evaluation.md (then any other docs/*.md, alphabetically; docs/benchmarks.md is a
   results log and is not walked); slurm/README.md. The docs follow a project's life:
   models and layouts, checkpoints, export of the demo run (then loading it, lm-eval on it,
   importing it back), evaluation of the demo run's checkpoint. Every file needs only
   ``make demo`` and its own earlier blocks, so ``--only FILE`` walks one file after the
   setup. A block's commands run one by one from the clone's root, each as
   ``bash -o pipefail -c COMMAND`` (a backslash at the end of a line continues the command;
   a line starting with ``#`` is a comment), with stdin closed (a prompt fails instead of
   waiting) and the block's timeout (default 900 s) over all of them; the first failure
   ends the block. A ```python block is a script: it runs as ``.venv/bin/python FILE`` from
   the clone's root. Untagged blocks are output or layout and are not run. Nothing of the
   caller's virtual environment reaches the commands (VIRTUAL_ENV, PYTHONPATH and every
   venv's bin/ on PATH are dropped), so a bare ``python -m plait...`` fails as it would for
   a new user.
4. The ``--help`` of every plait command (the seven below and any other ``-m plait.X`` the
   walked files mention), three times each: the first and the best wall time, target under
   2 s, and whether it printed a usage (a ``--help`` that does something else fails).
5. A table: file:line, ok / skipped / FAILED, seconds, per block; the ``--help`` times; the
   total. Tracked files that the commands changed in the clone are reported. Exit code 1
   when a block or a ``--help`` failed or a marker is malformed, else 0.

Each command prints file:line, the command, ok / FAILED and its seconds, and on a failure the
last 40 lines of its output. ``--keep DIR`` keeps the clone (``DIR/plait``), the command
logs (``DIR/logs``) and the python blocks' scripts (``DIR/blocks``); ``DIR`` must not exist
or be empty. ``--list`` prints the blocks, markers and commands of the checkout at
``--repo`` (working tree, not HEAD) and runs nothing.

Markers. A block that cannot run on a 2-core CPU machine without network access is marked in
the markdown itself, with an HTML comment (invisible when rendered) on the line or lines
right before its opening fence:

    <!-- walk: skip: REASON -->              the block is reported as skipped, with REASON
    <!-- walk: skip `PREFIX`: REASON -->     only its commands that start with PREFIX
    <!-- walk: slow: REASON -->              skipped unless --slow (runnable, but long)
    <!-- walk: slow `PREFIX`: REASON -->     only its commands that start with PREFIX
    <!-- walk: timeout SECONDS -->           the block's timeout instead of --timeout

Reasons are what the block needs: a GPU, a CUDA wheel download, a Slurm cluster (sbatch),
network or hub access, or the reader's own paths in a template. Prefer making a command
runnable (the bundled corpus data/corpus/devils_dictionary.jsonl, configs/tiny.yaml, the
outputs of earlier commands) to marking it. A ``<!-- walk: ... -->`` comment anywhere else,
or one the grammar above does not read, fails the walk.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
DOCS_ORDER = [
    "docs/models.md",
    "docs/parallelism.md",
    "docs/checkpoints.md",
    "docs/export.md",
    "docs/evaluation.md",
]
NOT_WALKED = {"docs/benchmarks.md", "docs/benchmarks_archive.md"}  # results: records, not a guide
CLIS = [
    "plait.launcher.train",
    "plait.launcher.export",
    "plait.launcher.evaluate",
    "plait.launcher.plan",
    "plait.data.prepare",
    "plait.data.lastword",
    "plait.models.presets",
]
SHELL_LANGS = {"bash", "sh", "shell"}
PYTHON_LANGS = {"python", "py", "python3"}
HELP_TARGET_S = 2.0
TAIL_LINES = 40

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
MARKER = re.compile(r"^\s*<!--\s*walk:\s*(?P<body>.*?)\s*-->\s*$")
MARKER_SKIP = re.compile(r"^(?P<kind>skip|slow)(?:\s+`(?P<prefix>[^`]+)`)?\s*:\s*(?P<reason>\S.*)$")
MARKER_TIMEOUT = re.compile(r"^timeout\s+(?P<s>\d+)$")
MODULE = re.compile(r"-m\s+(plait(?:\.[A-Za-z_]\w*)+)")


# ---------------------------------------------------------------------------- the markdown


@dataclass
class Command:
    line: int  # 1-based line of the command's first line in its file
    text: str  # what runs: the lines as written (continuations kept), or a python block
    skip: str | None = None  # why it is not run ("skip: ..." / "slow: ...")

    @property
    def shown(self) -> str:
        """One line: continuations joined, runs of blanks squeezed."""
        return " ".join(self.text.replace("\\\n", " ").split())


@dataclass
class Block:
    file: str
    line: int  # the opening fence's line
    lang: str
    commands: list[Command]
    skip: str | None = None
    slow: str | None = None
    timeout: float | None = None
    markers: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def walked_files(repo: Path) -> list[str]:
    """README.md, the docs in their order (then any other docs/*.md), slurm/README.md."""
    files = ["README.md"]
    docs = sorted(p.relative_to(repo).as_posix() for p in (repo / "docs").glob("*.md"))
    files += [d for d in DOCS_ORDER if d in docs]
    files += [d for d in docs if d not in DOCS_ORDER and d not in NOT_WALKED]
    if (repo / "slurm" / "README.md").is_file():
        files.append("slurm/README.md")
    return files


def split_commands(body: list[str], first_line: int) -> list[Command]:
    """A shell block's commands: a line ending in a backslash continues on the next one;
    blank lines and lines starting with ``#`` (outside a continuation) are dropped."""
    commands: list[Command] = []
    pending: list[str] = []
    start = 0
    for i, raw in enumerate(body):
        line = raw.rstrip()
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = first_line + i
        pending.append(line)
        if not line.endswith("\\"):
            commands.append(Command(start, "\n".join(pending)))
            pending = []
    if pending:
        commands.append(Command(start, "\n".join(pending)))
    return commands


def parse_markdown(path: Path, name: str) -> tuple[list[Block], list[str]]:
    """The runnable blocks of one file and the errors found in its walk markers."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    errors: list[str] = []
    used_markers: set[int] = set()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, lang = m["fence"], len(m["indent"]), m["info"].lower()
        j = i + 1
        while j < len(lines):
            close = lines[j].strip()
            if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                break
            j += 1
        body = [
            ln[indent:] if ln[:indent].strip() == "" else ln.lstrip() for ln in lines[i + 1 : j]
        ]
        # markers: HTML comments on the lines right before the fence (blank lines between)
        markers: list[tuple[int, str]] = []
        k = i - 1
        while k >= 0:
            if not lines[k].strip():
                k -= 1
                continue
            mm = MARKER.match(lines[k])
            if not mm:
                break
            markers.append((k, mm["body"]))
            k -= 1
        if lang in SHELL_LANGS or lang in PYTHON_LANGS:
            if lang in SHELL_LANGS:
                commands = split_commands(body, i + 2)
            else:
                commands = [Command(i + 2, "\n".join(body) + "\n")]
            block = Block(name, i + 1, lang, commands)
            for k, text in reversed(markers):
                used_markers.add(k)
                block.markers.append(text)
                ms, mt = MARKER_SKIP.match(text), MARKER_TIMEOUT.match(text)
                if mt:
                    block.timeout = float(mt["s"])
                elif ms and ms["prefix"]:
                    hits = [c for c in commands if c.shown.startswith(ms["prefix"])]
                    if not hits:
                        errors.append(
                            f"{name}:{k + 1}: marker names `{ms['prefix']}`, "
                            f"which no command of the block starts with"
                        )
                    for c in hits:
                        c.skip = f"{ms['kind']}: {ms['reason']}"
                elif ms and ms["kind"] == "skip":
                    block.skip = ms["reason"]
                elif ms:
                    block.slow = ms["reason"]
                else:
                    errors.append(f"{name}:{k + 1}: unreadable walk marker: {text!r}")
            if commands or block.skip:
                blocks.append(block)
        i = j + 1
    for k, line in enumerate(lines):
        if "<!-- walk:" in line.replace("<!--walk:", "<!-- walk:") and k not in used_markers:
            errors.append(f"{name}:{k + 1}: walk marker not right before a bash/sh/python block")
    return blocks, errors


def parse_all(repo: Path, only: list[str] | None) -> tuple[list[Block], list[str]]:
    files = walked_files(repo)
    if only:
        unknown = [f for f in only if f not in files]
        if unknown:
            raise SystemExit(
                f"docs_walk: --only {' '.join(unknown)}: not a walked file "
                f"(walked: {', '.join(files)})"
            )
        files = [f for f in files if f in only]
    blocks: list[Block] = []
    errors: list[str] = []
    for f in files:
        b, e = parse_markdown(repo / f, f)
        blocks += b
        errors += e
    return blocks, errors


def mentioned_modules(repo: Path) -> list[str]:
    """The seven CLIs and every other ``-m plait.X`` the walked files mention."""
    found = list(CLIS)
    for f in walked_files(repo):
        for mod in MODULE.findall((repo / f).read_text()):
            if mod not in found:
                found.append(mod)
    return found


# ---------------------------------------------------------------------------- running


def clean_env() -> dict[str, str]:
    """The caller's environment without any virtual environment or PYTHONPATH."""
    env = dict(os.environ)
    for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX"):
        env.pop(var, None)
    keep = []
    for d in env.get("PATH", "").split(os.pathsep):
        if d and (Path(d).parent / "pyvenv.cfg").is_file():
            continue
        keep.append(d)
    env["PATH"] = os.pathsep.join(keep)
    return env


@dataclass
class Ran:
    code: int | None  # None: timed out
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.code == 0

    def tail(self, n: int = TAIL_LINES, width: int = 300) -> str:
        """The last n lines, a progress bar's redraws (carriage returns) as one line each."""
        lines = []
        for line in self.log.read_text(errors="replace").split("\n"):
            last = line.rstrip("\r").rsplit("\r", 1)[-1].rstrip()
            if last:
                lines.append(last if len(last) <= width else last[: width - 3] + "...")
        return "\n".join(lines[-n:])


def run(argv: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float) -> Ran:
    """Run argv in its own process group, output to log; on timeout the group is ended."""
    t0 = time.monotonic()
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:  # no such program (a .venv that make demo did not create)
            out.write(f"cannot start {argv[0]}: {e}\n".encode())
            return Ran(127, time.monotonic() - t0, log)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            code = None
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return Ran(code, time.monotonic() - t0, log)


def short(text: str, width: int = 110) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 3] + "..."


def say(msg: str = "") -> None:
    print(msg, flush=True)


@dataclass
class BlockResult:
    block: Block
    status: str  # ok | skipped | FAILED
    seconds: float = 0.0
    note: str = ""


def run_block(block: Block, n: int, clone: Path, env: dict[str, str], work: Path,
              default_timeout: float, slow: bool) -> BlockResult:
    say(
        f"\n== {block.where} ({block.lang}, {len(block.commands)} command"
        f"{'s' if len(block.commands) != 1 else ''})"
    )
    if block.skip:
        say(f"   skipped: {block.skip}")
        return BlockResult(block, "skipped", note=block.skip)
    if block.slow and not slow:
        say(f"   skipped (slow; --slow runs it): {block.slow}")
        return BlockResult(block, "skipped", note=f"slow: {block.slow}")
    budget = block.timeout or default_timeout
    spent = 0.0
    skipped_notes = []
    for c, cmd in enumerate(block.commands):
        where = f"{block.file}:{cmd.line}"
        shown = cmd.shown if block.lang in SHELL_LANGS else f".venv/bin/python <{where} script>"
        say(f"   {where}  $ {short(shown)}")
        kind = cmd.skip.split(":", 1)[0] if cmd.skip else None
        if cmd.skip and not (kind == "slow" and slow):
            say(f"      skipped ({cmd.skip})")
            skipped_notes.append(f"`{short(cmd.shown, 30)}` ({cmd.skip})")
            continue
        tag = re.sub(r"[^A-Za-z0-9]+", "-", f"{n:02d}-{block.file}-{cmd.line}")
        log = work / "logs" / f"{tag}.log"
        if block.lang in SHELL_LANGS:
            argv = ["bash", "-o", "pipefail", "-c", cmd.text]
        else:
            script = work / "blocks" / f"{tag}.py"
            script.write_text(cmd.text)
            argv = [str(clone / ".venv" / "bin" / "python"), str(script)]
        ran = run(argv, clone, env, log, budget - spent)
        spent += ran.seconds
        if ran.ok:
            say(f"      ok  {ran.seconds:.1f} s")
            continue
        why = "timed out" if ran.code is None else f"exit {ran.code}"
        say(f"      FAILED ({why})  {ran.seconds:.1f} s; last lines of {log}:")
        for ln in ran.tail().splitlines():
            say(f"      | {ln}")
        rest = len(block.commands) - c - 1
        note = f"{where} {why}" + (f"; {rest} later command(s) not run" if rest else "")
        return BlockResult(block, "FAILED", spent, note)
    return BlockResult(block, "ok", spent, "; ".join(f"skipped {s}" for s in skipped_notes))


@dataclass
class HelpResult:
    module: str
    first: float
    best: float
    ok: bool
    note: str


def time_help(module: str, clone: Path, env: dict[str, str], work: Path) -> HelpResult:
    py = str(clone / ".venv" / "bin" / "python")
    times, note, ok = [], "", True
    for k in range(3):
        log = work / "logs" / f"help-{module}-{k}.log"
        ran = run([py, "-m", module, "--help"], clone, env, log, 120)
        times.append(ran.seconds)
        text = log.read_text(errors="replace")
        if not ran.ok or "usage:" not in text.lower():
            ok = False
            why = "timed out" if ran.code is None else f"exit {ran.code}"
            last = text.strip().splitlines()[-1] if text.strip() else "(no output)"
            note = f"no usage printed ({why}): {short(last, 70)}"
            break
    return HelpResult(module, times[0], min(times), ok, note)


# ---------------------------------------------------------------------------- main


def list_blocks(repo: Path, only: list[str] | None) -> int:
    blocks, errors = parse_all(repo, only)
    for b in blocks:
        flags = [f"skip: {b.skip}"] if b.skip else []
        flags += [f"slow: {b.slow}"] if b.slow else []
        flags += [f"timeout {b.timeout:.0f} s"] if b.timeout else []
        say(f"{b.where} ({b.lang}){'  [' + '; '.join(flags) + ']' if flags else ''}")
        for c in b.commands:
            mark = f"  [{c.skip}]" if c.skip else ""
            say(f"    {c.line}: {short(c.shown)}{mark}")
    for e in errors:
        say(f"marker error: {e}")
    say(f"\n--help timed: {', '.join(mentioned_modules(repo))}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--repo",
        type=Path,
        default=HERE,
        help="the repository to clone (its HEAD); default: this checkout",
    )
    ap.add_argument("--keep", type=Path, help="keep the clone, logs and scripts under DIR")
    ap.add_argument(
        "--only",
        action="append",
        metavar="FILE",
        help="walk only FILE (e.g. docs/export.md) after make demo; repeatable",
    )
    ap.add_argument("--slow", action="store_true", help="also run what is marked slow")
    ap.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds per block unless its marker says (default 900)",
    )
    ap.add_argument(
        "--list",
        action="store_true",
        help="print the blocks, markers and commands of --repo's working tree",
    )
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    if args.list:
        return list_blocks(repo, args.only)

    t_start = time.monotonic()
    head = subprocess.run(
        ["git", "-C", str(repo), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    say(f"docs walk of {repo} at HEAD {short(head, 90)}")
    if dirty:
        say(
            f"warning: {len(dirty)} uncommitted change(s) in {repo} are not walked "
            f"(the walk clones HEAD: commit first)"
        )

    if args.keep:
        work = args.keep.resolve()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"docs_walk: --keep {work}: not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="plait-docs-walk-"))
    (work / "logs").mkdir()
    (work / "blocks").mkdir()
    clone = work / "plait"
    env = clean_env()
    try:
        subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
        blocks, marker_errors = parse_all(clone, args.only)
        for e in marker_errors:
            say(f"marker error: {e}")
        say(f"clone: {clone}\n\n== setup: make demo (a fresh .venv, then the demo run)")
        setup = run(["make", "demo"], clone, env, work / "logs" / "00-make-demo.log", 1800)
        if not setup.ok:
            say(
                f"   FAILED ({'timed out' if setup.code is None else f'exit {setup.code}'})"
                f"  {setup.seconds:.1f} s"
            )
            for ln in setup.tail().splitlines():
                say(f"   | {ln}")
            return 1
        say(f"   ok  {setup.seconds:.1f} s")

        results = [
            run_block(b, n, clone, env, work, args.timeout, args.slow)
            for n, b in enumerate(blocks, start=1)
        ]

        say("\n== --help of every plait command (3 runs each)")
        helps = []
        for mod in mentioned_modules(clone):
            h = time_help(mod, clone, env, work)
            helps.append(h)
            flag = "" if h.ok else f"  FAILED: {h.note}"
            say(f"   {mod:28s} first {h.first:5.2f} s  best {h.best:5.2f} s{flag}")

        changed = subprocess.run(
            ["git", "-C", str(clone), "status", "--porcelain"], capture_output=True, text=True
        ).stdout.splitlines()
        total = time.monotonic() - t_start

        say("\n== results")
        say(f"   {'setup (make demo)':28s} {'ok':8s} {setup.seconds:7.1f} s")
        for r in results:
            note = f"  {r.note}" if r.note else ""
            say(f"   {r.block.where:28s} {r.status:8s} {r.seconds:7.1f} s{note}")
        say("\n   --help (target < 2 s)        first     best")
        for h in helps:
            over = "" if h.best < HELP_TARGET_S else "  over the target"
            state = "" if h.ok else f"  FAILED: {h.note}"
            say(f"   {h.module:28s} {h.first:5.2f} s  {h.best:5.2f} s{over}{state}")
        modified = [c for c in changed if not c.startswith("??")]
        untracked = [c[3:] for c in changed if c.startswith("??")]
        if modified:
            say("\n   tracked files the commands changed: " + ", ".join(c[3:] for c in modified))
        if untracked:
            say("   left untracked in the clone (not git-ignored): " + ", ".join(untracked))
        failed = [r for r in results if r.status == "FAILED"]
        bad_help = [h for h in helps if not h.ok]
        counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "FAILED")}
        say(
            f"\n   {counts['ok']} ok, {counts['skipped']} skipped, {counts['FAILED']} failed "
            f"blocks; {len(bad_help)} --help failure(s); {len(marker_errors)} marker error(s); "
            f"total {total / 60:.1f} min"
        )
        if args.keep:
            say(f"   kept: {clone}, logs in {work / 'logs'}")
        return 1 if failed or bad_help or marker_errors else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
