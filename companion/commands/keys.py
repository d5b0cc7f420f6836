"""`companion keys create | allow | show`: ZeroMQ CURVE keys for a backend beyond loopback."""

from __future__ import annotations

from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser("keys", parents=[common], help="create and list CURVE keys for a remote backend",
                       description="A backend bound beyond loopback accepts only clients whose public keys are listed.")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    c = ks.add_parser("create", parents=[common], help="create a key pair (client by default)")
    c.add_argument("--server", action="store_true", help="create the backend's key pair instead of a client's")
    c.add_argument("--force", action="store_true", help="replace an existing key pair")
    c.set_defaults(func=_create)
    a = ks.add_parser("allow", parents=[common], help="let a client's public key talk to this backend")
    a.add_argument("public_key", help="the client's .key file")
    a.add_argument("--user", required=True, help="the user id (client id) this key may act as")
    a.set_defaults(func=_allow)
    s = ks.add_parser("show", parents=[common], help="list the key files and allowed clients")
    s.set_defaults(func=_show)


def _dir(args) -> Path:
    from companion.cli import settings_from_args
    from companion.keys import keys_dir

    return keys_dir(settings_from_args(args).data_dir)


def _create(args) -> int:
    from companion.keys import create_keypair

    pub, sec = create_keypair(_dir(args), "server" if args.server else "client", force=args.force)
    print(f"public key: {pub}\nsecret key: {sec} (keep it private)")
    return 0


def _allow(args) -> int:
    from companion.keys import allow_client

    print(f"allowed {args.user}: {allow_client(_dir(args), Path(args.public_key), args.user)}")
    return 0


def _show(args) -> int:
    from companion.keys import allowed_clients

    d = _dir(args)
    for f in sorted(d.glob("*.key")):
        print(f"{f.name}: {f.read_text().split('public-key = ')[-1].splitlines()[0].strip()}")
    for key, user in allowed_clients(d).items() if d.exists() else []:
        print(f"allowed {user}: {key.decode()}")
    return 0
