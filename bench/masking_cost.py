"""What does secret masking cost per log line, and does it grow with the number of secrets?

Registers 1, 100 and 1000 random token-like secrets (each in all its encoded forms) in one
`SecretStore` after another, then masks a typical JSON access-log line (no secret in it) and the
same line carrying one secret, and prints microseconds per line. It also prints how long
registering the whole batch took, since that runs on the event loop during a load.
The design target: the per-line figure is flat from 100 to 1000 secrets.

    .venv/bin/python bench/masking_cost.py --lines 20000
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from registry.secrets import MASK, SecretStore  # noqa: E402

LINE = (
    '{"ts":"2026-12-02T01:33:32.123","level":"info","logger":"uvicorn.access",'
    '"message":"127.0.0.1:55555 - \\"POST /v1/chat/completions HTTP/1.1\\" 200",'
    '"request_id":"0123456789abcdef0123456789abcdef"}'
)


def per_line_us(store: SecretStore, line: str, lines: int) -> float:
    """Mean microseconds of one `mask(line)`."""
    started = time.perf_counter()
    for _ in range(lines):
        store.mask(line)
    return (time.perf_counter() - started) / lines * 1e6


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=20_000, help="mask calls per figure")
    args = parser.parse_args()
    print(f"line: {len(LINE)} chars; {args.lines} mask() calls per figure")
    print("secrets  register_ms  clean_us/line  with_secret_us/line")
    for count in (1, 100, 1000):
        values = [f"hf_{secrets.token_urlsafe(27)}" for _ in range(count)]
        store = SecretStore(max_secrets=count)
        started = time.perf_counter()
        store.add_many(values)
        register_ms = (time.perf_counter() - started) * 1e3
        dirty = LINE.replace("0123456789abcdef0123456789abcdef", values[-1])
        assert values[-1] not in store.mask(dirty)
        assert MASK in store.mask(dirty)
        clean = per_line_us(store, LINE, args.lines)
        with_secret = per_line_us(store, dirty, args.lines)
        print(f"{count:7d}  {register_ms:11.2f}  {clean:13.2f}  {with_secret:19.2f}")


if __name__ == "__main__":
    main()
