"""Operator command for API keys: `python -m api.keys create --name alice [--scope custom_code]`, `list`, `revoke`,
`grant`."""

from __future__ import annotations

import argparse
import json

from core.registry import Registry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m api.keys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="make a key; it is printed once and stored only as a hash")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", action="append", default=[], help="extra scope, e.g. custom_code (repeatable)")
    sub.add_parser("list", help="list keys (ids, names, scopes)")
    revoke = sub.add_parser("revoke")
    revoke.add_argument("key_id")
    grant = sub.add_parser("grant", help="add a scope to a key")
    grant.add_argument("key_id")
    grant.add_argument("scope")
    args = parser.parse_args(argv)
    registry = Registry()
    if args.command == "create":
        print(registry.create_key(args.name, args.scope))
    elif args.command == "list":
        for record in registry.list_keys():
            print(json.dumps(record))
    elif args.command == "revoke":
        raise SystemExit(0 if registry.revoke_key(args.key_id) else f"no key {args.key_id}")
    elif args.command == "grant":
        registry.grant_scope(args.key_id, args.scope)


if __name__ == "__main__":
    main()
