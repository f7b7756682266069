"""`privscore`: the one command line of the service (serve, and probes of a running server)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc

from service.config import ConfigError, add_server_arguments, settings_from

DEFAULT_TARGET = "127.0.0.1:50051"


def _target(args: argparse.Namespace) -> str:
    return str(args.target or os.environ.get("PRIVSCORE_TARGET", DEFAULT_TARGET))


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.logs import configure_logging
    from service.server import StartupError, serve

    try:
        settings = settings_from(args)
    except ConfigError as error:
        print(f"privscore serve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        print(f"privscore serve: {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from service.client.probe import health_status

    try:
        status = health_status(_target(args), args.service)
    except grpc.RpcError as error:
        print(f"privscore health: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _cmd_services(args: argparse.Namespace) -> int:
    from service.client.probe import list_services

    try:
        names = list_services(_target(args))
    except grpc.RpcError as error:
        print(f"privscore services: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privscore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")
    add_server_arguments(serve)
    serve.set_defaults(run=_cmd_serve)

    target_help = f"server address, default {DEFAULT_TARGET} (env PRIVSCORE_TARGET)"
    health = commands.add_parser("health", help="print a running server's health status")
    health.add_argument("--target", help=target_help)
    health.add_argument("--service", default="", help="service name; empty for the whole server")
    health.set_defaults(run=_cmd_health)

    services = commands.add_parser("services", help="list a running server's services")
    services.add_argument("--target", help=target_help)
    services.set_defaults(run=_cmd_services)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
