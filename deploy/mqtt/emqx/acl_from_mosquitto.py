"""EMQX's acl.conf from the Mosquitto ACL that `parking gates provision` writes.

    python deploy/mqtt/emqx/acl_from_mosquitto.py broker/acl_file > acl.conf

The same rules: a user's `topic write` topics become what it may publish, its `topic read`
topics what it may subscribe to (`topic readwrite`, or no access word, both), and everything
else is denied. EMQX checks a subscription when it is made (a `$share/<group>/...` one against
the topic after the group), so a gate cannot subscribe to another gate's topics, nor to `#`.
Only the lines `parking gates provision` writes are accepted: `user`, `topic`, comments.
"""

import sys
from pathlib import Path

ACCESS = {"read": ("subscribe",), "write": ("publish",), "readwrite": ("publish", "subscribe")}


class AclError(ValueError):
    pass


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    """User -> {"publish": [...], "subscribe": [...]}, in the file's order."""
    rules: dict[str, dict[str, list[str]]] = {}
    user: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "user" and len(words) == 2:
            user = words[1]
            rules.setdefault(user, {"publish": [], "subscribe": []})
        elif words[0] == "topic" and len(words) in (2, 3) and user is not None:
            access, topic = ("readwrite", words[1]) if len(words) == 2 else (words[1], words[2])
            if access not in ACCESS:
                raise AclError(f"line {number}: unknown access {access!r}")
            for action in ACCESS[access]:
                rules[user][action].append(topic)
        else:
            raise AclError(f"line {number}: not a line `parking gates provision` writes: {line!r}")
    return rules


def _quoted(value: str) -> str:
    if '"' in value or "\\" in value:
        raise AclError(f"{value!r}: quotes and backslashes are not valid in users or topics")
    return f'"{value}"'


def emqx_acl(rules: dict[str, dict[str, list[str]]]) -> str:
    lines = [
        "%% Written by deploy/mqtt/emqx/acl_from_mosquitto.py from `parking gates provision`'s",
        "%% acl_file; regenerate rather than edit. Anything not allowed here is denied.",
    ]
    for user, actions in rules.items():
        for action in ("publish", "subscribe"):
            if actions[action]:
                topics = ", ".join(_quoted(topic) for topic in actions[action])
                lines.append(f"{{allow, {{username, {_quoted(user)}}}, {action}, [{topics}]}}.")
    lines.append("{deny, all}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        sys.stdout.write(emqx_acl(parse(Path(argv[0]).read_text(encoding="utf-8"))))
    except AclError as exc:
        print(f"acl_from_mosquitto: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
