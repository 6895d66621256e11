"""Secret scan of the repository: ``python -m deploy.secret_scan`` (part of ``make test``).

Scans every file git tracks, plus new files it does not ignore, for credentials that must never be
committed: private keys, cloud and SaaS tokens with a recognisable shape (AWS, GitHub, Slack, Google,
Stripe, PagerDuty-style integration keys in URLs), JWTs, credentials inside URLs, and secret-named
assignments (``password = "..."``, ``token: ...``) whose value looks random (Shannon entropy), not a
placeholder (``CHANGE-ME``, ``${VAR}``, ``<token>``, ``example``, ...).

Rules aim at what is certainly a secret, so the scan can gate ``make test`` without a baseline to
maintain. Under ``tests/`` (deliberate fakes: signing keys, tokens) only the unmistakable shapes apply,
not the entropy rule. A line is exempt with ``secret-scan: allow`` (or detect-secrets'
``pragma: allowlist secret``) on it; ``.secret-scan-allow`` may list path globs to skip.

Findings print as ``path:line: rule: <redacted excerpt>`` (the value itself is never printed in full);
the exit status is 1 when there is any.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 2 * 1024 * 1024
ALLOW_MARKERS = ("secret-scan: allow", "pragma: allowlist secret")
ALLOW_FILE = ".secret-scan-allow"
SKIP_SUFFIXES = (".safetensors", ".pt", ".png", ".jpg", ".jpeg", ".gif", ".ico", ".pdf", ".gz", ".zip", ".whl")

# (rule, pattern): a match is a finding (its group "secret", or the whole match, is what gets redacted).
SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("private-key", re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----")),
    ("aws-access-key-id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("github-token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{50,})\b")),
    ("slack-token", re.compile(r"\bxox[abposr]-[0-9A-Za-z-]{20,}")),
    (
        "slack-webhook",
        re.compile(r"https://hooks\.slack\.com/services/T[0-9A-Z]{6,}/B[0-9A-Z]{6,}/[0-9A-Za-z]{20,}"),
    ),
    ("google-api-key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b")),
    ("stripe-key", re.compile(r"\b[rs]k_live_[0-9A-Za-z]{20,}\b")),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")),
    (
        "url-credentials",
        re.compile(r"\b[a-z][a-z0-9+.-]{1,15}://[^\s/:@'\"]{1,64}:(?P<secret>[^\s/:@'\"]{8,})@[\w.-]+"),
    ),
)
SECRET_NAME = (
    r"(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
    r"client[_-]?secret|routing[_-]?key|hmac[_-]?key|signing[_-]?key|auth)"
)
ASSIGNMENT = re.compile(
    rf"""(?ix)\b[\w.-]*{SECRET_NAME}[\w.-]*["']?\s*(?::|=|:=|=>)\s*(?P<q>["']?)(?P<secret>[^\s"'`,;)}}\]]{{16,}})(?P=q)"""
)
PLACEHOLDER = re.compile(
    r"(?i)change[-_]?me|example|placeholder|dummy|redacted|your[-_]|xxxx|\*\*\*|<[^>]*>|\$\{|\{\{|%\(|^\$|"
    r"^(?:none|null|true|false|env|file|secret|token|password)$"
)
# Tests hold deliberate fakes (signing keys, routing keys): there only the unmistakable shapes apply.
TEST_PATHS = ("tests/*", "*/tests/*", "test_*.py", "*/test_*.py")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.excerpt}"


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    if not text:
        return 0.0
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _redact(value: str) -> str:
    return value[:4] + "…" + f"({len(value)} chars)" if len(value) > 6 else "…"


def _looks_random(value: str) -> bool:
    if PLACEHOLDER.search(value):
        return False
    if re.fullmatch(r"[\w.-]*\.(?:py|pem|key|crt|json|ya?ml|txt|sh|env)", value) or value.startswith(("/", "./", "~/")):
        return False  # a file name or path (e.g. /run/secrets/...)
    if "(" in value or "[" in value:
        return False  # code: a call or a subscript
    if re.fullmatch(r"[A-Za-z_][\w.]*(?:\(\))?", value) and not re.search(r"\d", value):
        return False  # an identifier or dotted name: settings.influx_token, os.environ
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    return entropy(value) >= 3.5 and classes >= 2


def scan_text(path: str, text: str) -> Iterator[Finding]:
    is_test = any(fnmatch.fnmatch(path, g) for g in TEST_PATHS)
    for lineno, line in enumerate(text.splitlines(), 1):
        if any(marker in line for marker in ALLOW_MARKERS):
            continue
        for rule, pattern in SHAPES:
            for m in pattern.finditer(line):
                secret = m.groupdict().get("secret") or m.group(0)
                if rule == "url-credentials" and not _looks_random(secret):
                    continue
                yield Finding(path, lineno, rule, _redact(secret))
        for m in () if is_test else ASSIGNMENT.finditer(line):
            if _looks_random(m.group("secret")):
                yield Finding(path, lineno, "secret-assignment", _redact(m.group("secret")))


def repo_files(root: Path) -> list[str]:
    """Tracked files plus untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return sorted({p for p in out.decode().split("\0") if p})


def _allowed_globs(root: Path) -> list[str]:
    path = root / ALLOW_FILE
    if not path.is_file():
        return []
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def scan(root: Path, paths: Iterable[str] | None = None) -> list[Finding]:
    globs = _allowed_globs(root)
    findings: list[Finding] = []
    for rel in paths if paths is not None else repo_files(root):
        if rel.endswith(SKIP_SUFFIXES) or any(fnmatch.fnmatch(rel, g) for g in globs):
            continue
        path = root / rel
        try:
            if not path.is_file() or path.stat().st_size > MAX_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue  # binary
        findings.extend(scan_text(rel, data.decode("utf-8", errors="replace")))
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("paths", nargs="*", help="Files to scan (default: the repository's files)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    findings = scan(args.root, args.paths or None)
    for f in findings:
        print(f, file=sys.stderr)
    n = len(repo_files(args.root)) if not args.paths else len(args.paths)
    print(f"secret scan: {len(findings)} finding(s) in {n} files", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
