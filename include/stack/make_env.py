"""Write a docker-compose ``.env`` file with fresh random secrets.

Run as ``python -m stack.make_env --out .env``. It starts from ``.env.example`` (so every variable the compose
file needs is present) and replaces each secret placeholder with a new random value. It refuses to overwrite an
existing file unless ``--force`` is given, and writes the file with mode 0600. Secrets are never printed.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / ".env.example"


def fernet_key() -> str:
    """A Fernet key (32 random bytes, url-safe base64), the format ``AIRFLOW__CORE__FERNET_KEY`` needs."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def token() -> str:
    """A 43-character url-safe random token (256 bits)."""
    return secrets.token_urlsafe(32)


# Which generator fills which placeholder variable; anything else keeps the example's value.
GENERATORS: dict[str, Callable[[], str]] = {
    "POSTGRES_PASSWORD": token,
    "AIRFLOW_ADMIN_PASSWORD": token,
    "AIRFLOW_JWT_SECRET": token,
    "AIRFLOW_SECRET_KEY": token,
    "AIRFLOW_FERNET_KEY": fernet_key,
    "CANARY_GATEWAY_TOKEN": token,
}

_LINE = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def render(example_text: str) -> str:
    """The example file with every placeholder secret replaced by a fresh value; comments are kept."""
    out = []
    for line in example_text.splitlines():
        match = _LINE.match(line)
        if match and match["name"] in GENERATORS:
            line = f"{match['name']}={GENERATORS[match['name']]()}"
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, write the file; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m stack.make_env", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".env", help="file to write (default: .env)")
    parser.add_argument("--example", type=Path, default=EXAMPLE, help="template (default: .env.example)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"{args.out} exists; keep it, or pass --force to replace every secret in it", file=sys.stderr)
        return 2
    if not args.example.is_file():
        print(f"template {args.example} not found; pass --example PATH", file=sys.stderr)
        return 2
    text = render(args.example.read_text())
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(args.out, 0o600)
    print(f"wrote {args.out} with fresh secrets (mode 0600); it is git-ignored: never commit it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
