"""`holdwall-stream`: operator commands (verify, db, outbox, dlq, run).

The worker is `faust -A holdwall_stream worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from holdwall_stream.errors import (
    EXIT_DATABASE_UNAVAILABLE,
    EXIT_KAFKA_UNAVAILABLE,
    HoldwallError,
    KafkaDisabledError,
    SettingsError,
)
from holdwall_stream.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holdwall-stream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", help="local broker (unless KAFKA_BROKERS is set) + worker")

    verify = commands.add_parser("verify", help="check DNS, TCP, TLS, SASL, topics, round trip")
    verify.add_argument("--json", action="store_true", help="print the results as JSON")

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("init", help="create the schema (idempotent)")
    ddl = db.add_parser("ddl", help="print the DDL of a dialect, or --write tables/*.sql")
    ddl.add_argument("dialect", nargs="?", choices=["postgresql", "sqlite"], default="postgresql")
    ddl.add_argument("--write", action="store_true", help="regenerate tables/*.sql")

    outbox = commands.add_parser(
        "outbox", help="the outbox, read from the database"
    ).add_subparsers(dest="outbox_command", required=True)
    status = outbox.add_parser(
        "status", help="backlog per partition, the row at its head, last publication"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    dlq = commands.add_parser("dlq", help="dead letters").add_subparsers(
        dest="dlq_command", required=True
    )
    listing = dlq.add_parser("list", help="list dead letters not yet replayed")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--all", action="store_true", help="include replayed ones")
    listing.add_argument("--json", action="store_true")
    show = dlq.add_parser("show", help="one dead letter with its headers and payload")
    show.add_argument("id", type=int)
    replay = dlq.add_parser("replay", help="re-send to the events topic with the same event id")
    replay.add_argument("ids", type=int, nargs="*")
    replay.add_argument("--all", action="store_true", help="every dead letter not yet replayed")
    purge = dlq.add_parser("purge", help="delete dead letters from the table")
    purge.add_argument("--yes", action="store_true", help="confirm the deletion")
    purge.add_argument("--replayed-only", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        from holdwall_stream.embedded import run_local

        return run_local()
    if args.command == "db" and args.db_command == "ddl":
        return _ddl(args)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"holdwall-stream: invalid setting: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Each command reports a Kafka failure itself, in one line; the clients' own logs of
    # it would only repeat it.
    for logger in ("aiokafka", "holdwall_stream.messaging.producer"):
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    handler: Callable[[Settings, argparse.Namespace], Awaitable[int]] = {
        "verify": _verify,
        "db": _db_init,
        "outbox": _outbox_status,
        "dlq": _dlq,
    }[args.command]
    try:
        return asyncio.run(handler(settings, args))
    except HoldwallError as exc:
        print(f"holdwall-stream: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        from aiokafka.errors import KafkaError

        from holdwall_stream.db.errors import is_database_unavailable, unreachable

        if isinstance(exc, KafkaError):
            print(
                f"holdwall-stream: Kafka connection error at {','.join(settings.bootstrap_servers)}"
                f": {exc}; start the brokers or correct KAFKA_BROKERS, then run the command again",
                file=sys.stderr,
            )
            return EXIT_KAFKA_UNAVAILABLE
        if not is_database_unavailable(exc):
            raise
        error = unreachable(settings, exc, then="run the command again")
        print(f"holdwall-stream: {error}", file=sys.stderr)
        return EXIT_DATABASE_UNAVAILABLE


def _ddl(args: argparse.Namespace) -> int:
    from holdwall_stream.db.schema import render_ddl, write_ddl_files

    if args.write:
        for path in write_ddl_files():
            print(f"wrote {path}")
    else:
        print(render_ddl(args.dialect), end="")
    return 0


async def _verify(settings: Settings, args: argparse.Namespace) -> int:
    from holdwall_stream.verify import format_results, run_checks

    results = await run_checks(settings)
    print(format_results(results, as_json=args.json))
    return 0 if all(result.ok for result in results) else EXIT_FAILED


@asynccontextmanager
async def _engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The database for one command, its connections closed when the command ends."""
    from holdwall_stream.db.engine import create_engine

    engine = create_engine(settings)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _db_init(settings: Settings, _args: argparse.Namespace) -> int:
    from holdwall_stream.db.schema import init_schema

    async with _engine(settings) as engine:
        await init_schema(engine)
    print(f"schema ready on {settings.database_url_redacted}")
    return 0


async def _outbox_status(settings: Settings, args: argparse.Namespace) -> int:
    """What the relay has left to do, without a worker: for when health cannot be asked."""
    from sqlalchemy import inspect

    from holdwall_stream.errors import SchemaMissingError
    from holdwall_stream.outbox import store

    async with _engine(settings) as engine, engine.connect() as connection:
        if not await connection.run_sync(lambda sync: inspect(sync).has_table("outbox")):
            raise SchemaMissingError(
                f"no outbox table in {settings.database_url_redacted}: check DATABASE_URL, "
                "or create the schema with `holdwall-stream db init`"
            )
        partitions = await store.partition_backlogs(connection)
        dead_lettered = await store.dead_lettered_count(connection)
        published_age = await store.last_published_age_s(connection)
    # The totals from the partitions' own figures: counting the backlog again would read
    # every unpublished row a second time.
    unpublished = sum(p.unpublished for p in partitions)
    ages = [p.oldest_age_s for p in partitions if p.oldest_age_s is not None]
    status = {
        "database": settings.database_url_redacted,
        "unpublished": unpublished,
        "oldest_unpublished_age_s": max(ages, default=None),
        "dead_lettered": dead_lettered,
        "last_published_age_s": published_age,
        "partitions": [dataclasses.asdict(p) for p in partitions],
    }
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"outbox on {status['database']}")
    print(f"{'partition':>9}  {'unpublished':>11}  {'oldest':>9}  head row (attempts, last error)")
    for p in partitions:
        error = f", {p.head_last_error[:80]}" if p.head_last_error else ""
        print(
            f"{p.partition:>9}  {p.unpublished:>11,}  {_seconds(p.oldest_age_s):>9}  "
            f"#{p.head_id} ({p.head_attempts}{error})"
        )
    last = "never (or pruned)" if published_age is None else f"{published_age:.1f} s ago"
    print(f"{unpublished:,} unpublished in all; last row published {last}")
    if dead_lettered:
        print(
            f"{dead_lettered:,} row(s) dead-lettered as too large (`holdwall-stream dlq list` "
            "shows their dead letters; `dlq replay` sends one once the limit allows it)"
        )
    return 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


async def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    from holdwall_stream.db.schema import init_schema

    async with _engine(settings) as engine:
        await init_schema(engine)
        return await _dlq_command(settings, engine, args)


async def _dlq_command(settings: Settings, engine: Any, args: argparse.Namespace) -> int:
    from holdwall_stream.pipeline import dlq

    if args.dlq_command == "list":
        letters = await dlq.list_dead_letters(engine, limit=args.limit, include_replayed=args.all)
        rows = [_summary(letter) for letter in letters]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(
                    f"{row['id']:>6}  {row['created_at']}  {row['reason']:<16} "
                    f"event={row['event_id']}  {row['error'][:80]}"
                    + ("  (replayed)" if row["replayed_at"] else "")
                )
            print(f"{len(rows)} dead letter(s)")
        return 0
    if args.dlq_command == "show":
        letter = await dlq.get_dead_letter(engine, args.id)
        if letter is None:
            print(f"no dead letter with id {args.id}", file=sys.stderr)
            return EXIT_FAILED
        detail = _summary(letter) | {
            "headers": letter.headers,
            "key": _text(letter.key),
            "raw": _text(letter.raw),
        }
        print(json.dumps(detail, indent=2))
        return 0
    if args.dlq_command == "replay":
        return await _replay(settings, engine, args)
    if not args.yes:
        print("purge deletes dead letters for good: add --yes to confirm", file=sys.stderr)
        return EXIT_USAGE
    deleted = await dlq.purge(engine, replayed_only=args.replayed_only)
    print(f"purged {deleted} dead letter(s)")
    return 0


async def _replay(settings: Settings, engine: Any, args: argparse.Namespace) -> int:
    from holdwall_stream.messaging.producer import KafkaProducer
    from holdwall_stream.observability.metrics import Metrics
    from holdwall_stream.pipeline import dlq

    if not settings.kafka_enabled:
        raise KafkaDisabledError(
            "dlq replay sends to Kafka, which KAFKA_ENABLED=false switches off: run it with "
            "KAFKA_ENABLED=true (the dead letters stay in the table meanwhile)"
        )
    ids = list(args.ids)
    if args.all:
        ids += [letter.id for letter in await dlq.list_dead_letters(engine, limit=1_000_000)]
    if not ids:
        print("name dead letter ids to replay, or --all", file=sys.stderr)
        return EXIT_USAGE
    ids = list(dict.fromkeys(ids))  # an id named twice (or also by --all) is sent once
    producer = KafkaProducer(settings, Metrics())
    try:
        outcome = await dlq.replay(engine, producer, settings, ids)
    finally:
        await producer.stop()
    print(
        f"replayed {len(outcome.replayed)} dead letter(s): {' '.join(map(str, outcome.replayed))}"
    )
    for _dead_letter_id, why in sorted(outcome.not_replayed.items()):
        print(why, file=sys.stderr)
    return EXIT_FAILED if outcome.not_replayed else 0


def _summary(letter: Any) -> dict[str, Any]:
    return {
        "id": letter.id,
        "event_id": str(letter.event_id) if letter.event_id else None,
        "reason": letter.reason,
        "error": letter.error,
        "original_topic": letter.original_topic,
        "original_partition": letter.original_partition,
        "original_offset": letter.original_offset,
        "attempts": letter.attempts,
        "created_at": str(letter.created_at),
        "replayed_at": str(letter.replayed_at) if letter.replayed_at else None,
    }


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "backslashreplace")


if __name__ == "__main__":
    sys.exit(main())
