"""``flask numbers …``: set, list, show, delete, export and import number profiles from the command line.

Changes are recorded in the audit log (who: ``cli``) like the admin UI's. The commands need only the store
(``REDIS_URL``), not Kallglot or carrier credentials, and pick up a running demo's settings from
``.demo/env`` (see :mod:`app.envfile`). A configuration problem ends the command with its sentences.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import IO

import click
import redis
from flask import Flask
from flask.cli import AppGroup

from app.audit import AuditLog, diff
from app.config import KALLGLOT_MODES, ConfigError, Settings
from app.envfile import DEMO_ENV_FILE, environment_with_demo
from app.extensions import services
from app.profiles.store import TRANSPORT_TRADE_OFFS, TRANSPORTS, NumberProfile, ProfileError
from app.redis_connection import connect, parse_redis_target
from app.profiles.transfer import ProfileImportError, export_profiles, import_profiles

numbers_cli = AppGroup("numbers", help="Manage number profiles (mode and languages per called number).")


@numbers_cli.command("set")
@click.argument("number")
@click.option("--mode", type=click.Choice(KALLGLOT_MODES), default=None, help="Kallglot session mode.")
@click.option("--source", "source_language", default=None, help="Caller's language code, e.g. en.")
@click.option("--target", "target_language", default=None, help="Agent's language code, e.g. es.")
@click.option("--transport", type=click.Choice(TRANSPORTS), default=None,
              help="How calls reach Kallglot. " + " ".join(f"{name}: {line}." for name, line in TRANSPORT_TRADE_OFFS.items()))
@click.option("--browser-agents/--no-browser-agents", default=None,
              help="Offer calls to agents on the admin's Agent page first.")
@click.option("--browser-agent-wait", type=int, default=None,
              help="Seconds a call waits for a browser agent before the agent number or fallback (5-600).")
def set_profile(number: str, mode: str | None, source_language: str | None, target_language: str | None,
                transport: str | None, browser_agents: bool | None, browser_agent_wait: int | None) -> None:
    """Give NUMBER (E.164) its own profile; unset options keep the current values."""
    store = services().profiles
    current = store.for_number(number)
    profile = replace(current, mode=mode or current.mode, transport=transport or current.transport,
                      source_language=current.source_language if source_language is None else source_language,
                      target_language=current.target_language if target_language is None else target_language,
                      browser_agents=current.browser_agents if browser_agents is None else browser_agents,
                      browser_agent_wait_seconds=(current.browser_agent_wait_seconds if browser_agent_wait is None
                                                  else browser_agent_wait))
    try:
        store.set(number, profile)
    except ProfileError as exc:
        raise click.UsageError("\n".join(f"{k}: {v}" for k, v in exc.problems.items())) from None
    _audit("set profile", number, diff(current.to_dict() if current.own else None, profile.to_dict()))
    click.echo(f"{number}: {_describe(profile)}")


@numbers_cli.command("list")
def list_profiles() -> None:
    """List numbers with their own profile, and the default profile."""
    store = services().profiles
    for number, profile in store.all().items():
        click.echo(f"{number}: {_describe(profile)}")
    click.echo(f"(default): {_describe(store.default)}")


@numbers_cli.command("show")
@click.argument("number")
def show_profile(number: str) -> None:
    """Show the profile calls to NUMBER get."""
    profile = services().profiles.for_number(number)
    click.echo(f"{number}: {_describe(profile)}{'' if profile.own else ' (default)'}")


@numbers_cli.command("delete")
@click.argument("number")
def delete_profile(number: str) -> None:
    """Remove NUMBER's own profile; it falls back to the default."""
    before = services().profiles.for_number(number)
    removed = services().profiles.delete(number)
    if removed:
        _audit("delete profile", number, diff(before.to_dict(), None))
    click.echo(f"{number}: {'deleted' if removed else 'had no profile of its own'}")


@numbers_cli.command("export")
@click.argument("output", type=click.File("w"), default="-")
def export_command(output: IO[str]) -> None:
    """Write every number's own profile as JSON to OUTPUT (default: stdout)."""
    document = export_profiles(services().profiles)
    json.dump(document, output, indent=2, sort_keys=True)
    output.write("\n")
    click.echo(f"exported {len(document['profiles'])} profile(s)", err=True)


@numbers_cli.command("import")
@click.argument("source", type=click.File("r"))
def import_command(source: IO[str]) -> None:
    """Create or update the profiles in SOURCE (a JSON export; - for stdin): all valid, or none are written."""
    try:
        result = import_profiles(services().profiles, json.load(source))
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"not valid JSON: {exc}") from None
    except ProfileImportError as exc:
        raise click.ClickException("nothing imported:\n" + "\n".join(
            f"  {number}: {name} {message}" for number, found in exc.problems.items()
            for name, message in found.items())) from None
    for number, (before, after) in result.applied.items():
        _audit("import profile", number, diff(before.to_dict() if before else None, after.to_dict()))
    click.echo(f"imported {len(result.applied)} profile(s)")


#: The settings a profile command needs: the store and the default profile (problems() names them first).
_STORE_SETTINGS = ("REDIS_URL", "REDIS_NAMESPACE", "DEFAULT_MODE", "DEFAULT_SOURCE_LANGUAGE",
                   "DEFAULT_TARGET_LANGUAGE")


def settings_for_command_line() -> Settings | None:
    """The settings of an app being built by the ``flask`` command line, or None outside it.

    Read from the environment, filled in from a running demo's ``.demo/env``. Inside ``flask numbers …``
    only the store's settings must be valid; any other command needs the whole configuration. A problem
    raises :class:`click.ClickException` with one sentence per problem (click prints it, exit status 1),
    never a traceback.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    env = environment_with_demo(os.environ)
    source = f" (settings from the environment and {DEMO_ENV_FILE})" if DEMO_ENV_FILE.exists() else ""
    try:
        settings = Settings.from_env(env)
        problems = settings.problems()
    except ConfigError as exc:
        problems = exc.problems
        settings = None
    if _in_profile_command(ctx):
        problems = [p for p in problems if p.startswith(_STORE_SETTINGS)]
    if problems or settings is None:
        hint = "" if DEMO_ENV_FILE.exists() else \
            "\n(start the demo, kallglot-bridge-demo, in this directory and its settings are used)"
        raise click.ClickException("invalid configuration" + source + ":\n  - " + "\n  - ".join(problems) + hint)
    if _in_profile_command(ctx):
        _require_store(settings, source)
    return settings


def _require_store(settings: Settings, source: str) -> None:
    """Fail with a sentence, not a traceback, when the store cannot be reached (e.g. a stopped demo's file)."""
    # The same deployment (standalone, TLS, Cluster, Sentinel) and TLS rules as the service.
    client = connect(parse_redis_target(settings.redis_url, cluster=settings.redis_cluster), max_connections=5,
                     timeout_seconds=3, tls_verify=settings.redis_tls_verify, tls_ca=settings.redis_tls_ca)
    try:
        client.ping()
    except redis.RedisError as exc:
        stale = f" Is the demo that wrote {DEMO_ENV_FILE} still running?" if source else ""
        raise click.ClickException(f"the store at REDIS_URL cannot be reached ({type(exc).__name__}){source}."
                                   + stale) from None
    finally:
        client.close()


def _in_profile_command(ctx: click.Context | None) -> bool:
    while ctx is not None:
        if ctx.command is numbers_cli:
            return True
        ctx = ctx.parent
    return False


def _audit(action: str, number: str, changes: dict[str, list[object]]) -> None:
    svc = services()
    AuditLog(svc.redis, svc.keys).record("cli", action, number, changes)


def _describe(profile: NumberProfile) -> str:
    return (f"mode={profile.mode} source={profile.source_language or 'auto'} "
            f"target={profile.target_language or 'auto'}"
            + (f" browser-agents={profile.browser_agent_wait_seconds}s" if profile.browser_agents else "")
            + f" transport={profile.transport}")


def register_cli(app: Flask) -> None:
    """Attach the ``numbers`` command group to ``app``."""
    app.cli.add_command(numbers_cli)
