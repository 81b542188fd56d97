"""The `eventhub` entry point: the core commands plus those that need the facets."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from eventhub import cli
from eventhub.errors import EventhubError


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from api.app import create_app
    from eventhub.settings import load_settings

    try:
        settings = load_settings()
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(settings)
        web.run_app(
            app, host=settings.host, port=settings.port, loop=uvloop.new_event_loop(), print=None,
            access_log=None,
        )
    except EventhubError as exc:
        print(f"eventhub: {exc}", file=sys.stderr)
        return 2
    return 0


def _extra(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve every facet over HTTP (settings from the environment)")
    p.set_defaults(sync=_serve)


def main(argv: list[str] | None = None) -> int:
    parser = cli.build_parser(_extra)
    args = parser.parse_args(argv)
    if getattr(args, "sync", None) is not None:
        try:
            return int(args.sync(args))
        except EventhubError as exc:
            print(f"eventhub: {exc}", file=sys.stderr)
            return 2
    return cli.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
