"""``flowbus`` as a person meets it: every command explains itself, and a worker that cannot run
says why in one line and exits non-zero, never with a traceback."""

from __future__ import annotations

import argparse
import http.server
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import redis

from bus import Settings
from tests.conftest import KIND
from tests.support import ROOT, settings_env
from workers.bots import BARGE_IN_EVERY
from workers.cli import _settings, parser
from workers.server import LocalServer, free_port


def flowbus(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_fails_clearly(done: subprocess.CompletedProcess[str], status: int, *says: str) -> None:
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert re.match(r"flowbus( [a-z]+: error)?: |usage: ", message), message
    for text in says:
        assert text in done.stderr, (text, done.stderr)


def subparsers(p: argparse.ArgumentParser, path: str = "flowbus") -> Iterator[tuple[str, str]]:
    yield path, p.format_help()
    for action in p._actions:  # argparse keeps its subcommands nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subparsers(child, f"{path} {name}")


def test_every_command_has_help_with_an_example() -> None:
    helps = dict(subparsers(parser()))
    assert {"flowbus worker", "flowbus demo", "flowbus simulate"} <= helps.keys()
    assert {f"flowbus inspect {w}" for w in ("sessions", "session", "groups", "owners")} <= (
        helps.keys()
    )
    assert {f"flowbus dead {a}" for a in ("list", "show", "replay", "drop")} <= helps.keys()
    for command, text in helps.items():
        assert "example" in text, command
        assert f"\n  {command}" in text or command == "flowbus", command  # the example runs it


def test_every_argument_of_every_command_says_what_it_is() -> None:
    def commands(p: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
        for action in p._actions:  # argparse keeps its arguments nowhere public
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from commands(child, f"{path} {name}")
            else:
                yield path, action

    unexplained = [
        f"{path} {action.metavar or action.dest}"
        for path, action in commands(parser(), "flowbus")
        if not action.help
    ]
    assert unexplained == []


def test_the_demos_help_gives_the_prefix_it_takes_on_a_server_of_yours() -> None:
    text = " ".join(dict(subparsers(parser()))["flowbus demo"].split())
    assert "--prefix PREFIX key prefix (default flowbus on the embedded server" in text
    assert "a fresh demo-<random> one, printed, on a server given by --redis-url)" in text


def test_a_worker_given_an_unreachable_server_retries_then_says_so(settings: Settings) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    done = flowbus(
        "worker", "tests.workers.apps:steps", "--redis-url", url, "--connect-attempts", "2"
    )
    assert_fails_clearly(done, 1, "cannot reach the server after 2 attempt(s)", url)
    assert "connect_retried" in done.stderr  # the retry was logged, with its backoff
    assert "is the server running, and --redis-url (or FLOWBUS_REDIS_URL) right?" in done.stderr


@pytest.mark.parametrize(
    "args", [["inspect", "sessions"], ["end", "call-1"], ["dead", "list"], ["simulate"]]
)
def test_a_command_given_an_unreachable_server_says_what_to_check(args: list[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    done = flowbus(*args, "--redis-url", url)
    assert_fails_clearly(done, 1, "cannot reach the server after 3 attempt(s)", url)
    assert "is the server running, and --redis-url (or FLOWBUS_REDIS_URL) right?" in done.stderr


def test_a_worker_told_of_a_cluster_retries_one_unreachable_and_refuses_a_single_server(
    settings: Settings,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    args = ("worker", "tests.workers.apps:steps", "--cluster", "--connect-attempts", "2")
    done = flowbus(*args, "--redis-url", url)
    assert_fails_clearly(done, 1, "cannot reach the server after 2 attempt(s)", url)
    assert "connect_retried" in done.stderr
    done = flowbus(*args, env=settings_env(settings))  # a server, not a cluster
    assert_fails_clearly(done, 1, "the server is not a cluster's node (", "leave out --cluster")


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("tests.workers.apps", "is not MODULE:ATTR (for example myapp.services:crm)"),
        ("tests.workers.nothing_here:app", "cannot import module 'tests.workers.nothing_here'"),
        ("tests.workers.apps:missing", "has no attribute 'missing' (it has: "),
        ("tests.workers.apps:not_a_service", "is a dict, not a flowbus Service"),
        ("tests.workers.apps:make_steps_later", "make_steps_later is an async function"),
        (
            "tests.workers.broken_app:app",
            "importing 'tests.workers.broken_app' raised RuntimeError: the CRM credentials are "
            "missing (",
        ),
        (
            "tests.workers.sdk_app:app",
            "importing 'tests.workers.sdk_app' failed: No module named 'tests.workers.sdk'",
        ),
    ],
    ids=[
        "no-colon",
        "no-module",
        "no-attribute",
        "not-a-service",
        "async-factory",
        "import-raises",
        "dependency",
    ],
)
def test_a_worker_given_a_bad_target_says_what_is_wrong(
    settings: Settings, target: str, says: str
) -> None:
    assert_fails_clearly(flowbus("worker", target, env=settings_env(settings)), 2, says)


@pytest.mark.parametrize(
    ("code", "target", "says"),
    [
        (
            'import os\n\nKEY = os.environ["FLOWBUS_TEST_UNSET_KEY"]\n',
            "user_app:service",
            "raised KeyError: 'FLOWBUS_TEST_UNSET_KEY' (%s, line 3)",
        ),
        (
            "service = (\n",
            "user_app:service",
            "raised SyntaxError: '(' was never closed (user_app.py",
        ),
        (
            "def make(name):\n    return name\n",
            "user_app:make",
            "raised TypeError: make() missing 1 required positional argument: 'name'",
        ),
        # A script's sys.exit run on import: not a worker that exits 0 having run nothing.
        ("import sys\n\nsys.exit(0)\n", "user_app:service", "raised SystemExit: 0 (%s, line 3)"),
        (
            "import sys\n\ndef make():\n    sys.exit('no CRM key')\n",
            "user_app:make",
            "making the service user_app:make raised SystemExit: no CRM key (%s, line 4)",
        ),
        (
            "from flows import EventService\n\ncrm = EventService('crm')\n",
            "user_app:crm",
            "making the service user_app:crm raised InvalidHandlerError: service 'crm' has no "
            "event handlers: register some (@service.event_handler(...)) before it is started\n",
        ),
        (
            "from flows import EventService\n\ncrm = EventService('crm')\n"
            "crm.add_event_handler('on_no_such_event', print)\n",
            "user_app:crm",
            "raised UnknownEventError: unknown event 'on_no_such_event'",
        ),
    ],
    ids=[
        "missing-variable",
        "syntax-error",
        "factory-arguments",
        "exit-0",
        "factory-exit",
        "no-handlers",
        "flowbus-refuses",
    ],
)
def test_a_worker_whose_app_fails_to_load_points_at_the_apps_code_not_python_or_flowbus(
    tmp_path: Path, settings: Settings, code: str, target: str, says: str
) -> None:
    """Where the failure is, in the user's file, not in Python's import machinery (`<frozen
    os>`) or in flowbus's loader."""
    (tmp_path / "user_app.py").write_text(code)
    env = {**settings_env(settings), "PYTHONPATH": str(tmp_path)}
    done = flowbus("worker", target, env=env)
    assert_fails_clearly(done, 2, says.replace("%s", str(tmp_path / "user_app.py")))
    for elsewhere in ("<frozen", "importlib", "workers/app.py", "flows/handlers.py"):
        assert elsewhere not in done.stderr, done.stderr


def test_a_worker_whose_services_lifespan_fails_to_start_says_so_in_a_line(
    tmp_path: Path, settings: Settings
) -> None:
    (tmp_path / "user_app.py").write_text(
        "from contextlib import asynccontextmanager\n"
        "from flows import ActionService\n\n"
        "@asynccontextmanager\n"
        "async def crm():\n"
        "    raise OSError('the CRM at crm:443 is out of reach')\n"
        "    yield\n\n"
        "actions = ActionService(lifespan=crm)\n"
    )
    env = {**settings_env(settings), "PYTHONPATH": str(tmp_path)}
    done = flowbus("worker", "user_app:actions", env=env)
    where = tmp_path / "user_app.py"
    says = "the lifespan of service 'actions' failed to start: OSError: the CRM at crm:443 is "
    assert_fails_clearly(done, 1, f"{says}out of reach ({where}, line 6)\n")


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--partitions", "0"], {}, "partitions must be within 1..16384, not 0"),
        (["--lease-ttl", "soon"], {}, "argument --lease-ttl: invalid float value: 'soon'"),
        (["--dead-letter", "retry"], {}, "invalid choice: 'retry'"),
        (["--ack-mode", "later"], {}, "invalid choice: 'later'"),
        ([], {"FLOWBUS_ACK_MODE": "later"}, "set by --ack-mode or FLOWBUS_ACK_MODE"),
        (["--no-such-option"], {}, "unrecognized arguments: --no-such-option"),
        ([], {"FLOWBUS_MAX_DELIVERIES": "many"}, "FLOWBUS_MAX_DELIVERIES"),
        ([], {"FLOWBUS_METRICS_PORT": "x"}, "FLOWBUS_METRICS_PORT must be an integer"),
        ([], {"FLOWBUS_LOG_LEVEL": "loud"}, "FLOWBUS_LOG_LEVEL must be one of debug, info"),
        ([], {"FLOWBUS_EVENT_LOOP": "trio"}, "FLOWBUS_EVENT_LOOP must be one of uvloop, asyncio"),
        (["--redis-url", "http://127.0.0.1/0"], {}, "invalid Redis URL"),
        (["--lease-ttl", "nan"], {}, "lease_ttl_seconds must be a finite number, not nan (set by"),
        ([], {"FLOWBUS_CLUSTER": "yes"}, "FLOWBUS_CLUSTER='yes': must be true or false"),
        (["--metrics-port", "99999"], {}, "--metrics-port (or FLOWBUS_METRICS_PORT) must be 0..6"),
        ([], {"FLOWBUS_CONNECT_ATTEMPTS": "0"}, "FLOWBUS_CONNECT_ATTEMPTS) must be at least 1"),
        (["--worker-id", "w 1"], {}, "--worker-id: invalid worker id 'w 1': whitespace"),
        (["--worker-id", ""], {}, "--worker-id: invalid worker id: it is empty"),
        ([], {"FLOWBUS_HANDLER_TIMEOUT_SECONDS": "0"}, "FLOWBUS_HANDLER_TIMEOUT_SECONDS: handler"),
        ([], {"FLOWBUS_PREFIX": "a b"}, "FLOWBUS_PREFIX: prefix 'a b' must match"),
    ],
    ids=[
        "partitions",
        "lease-ttl",
        "policy",
        "ack-mode",
        "env-ack-mode",
        "unknown",
        "env-deliveries",
        "env-port",
        "env-log-level",
        "env-event-loop",
        "url",
        "lease-ttl-nan",
        "env-cluster",
        "metrics-port-range",
        "env-connect-attempts",
        "worker-id",
        "worker-id-empty",
        "env-handler-timeout",
        "env-prefix",
    ],
)
def test_a_worker_given_a_bad_option_says_which(
    settings: Settings, args: list[str], env: dict[str, str], says: str
) -> None:
    done = flowbus(
        "worker", "tests.workers.apps:steps", *args, env={**settings_env(settings), **env}
    )
    assert_fails_clearly(done, 2, says)


def test_the_ack_mode_option_reaches_the_workers_settings() -> None:
    args = parser().parse_args(["worker", "tests.workers.apps:steps", "--ack-mode", "batch"])
    assert _settings(args).ack_mode == "batch"
    args = parser().parse_args(["worker", "tests.workers.apps:steps"])
    assert _settings(args).ack_mode == "each"


def test_a_worker_whose_metrics_port_is_taken_says_so(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = flowbus(
            "worker",
            "tests.workers.apps:steps",
            "--metrics-port",
            port,
            "--metrics-host",
            "127.0.0.1",
            env=settings_env(settings),
        )
    assert_fails_clearly(done, 1, f"cannot serve metrics on 127.0.0.1:{port}")


def test_a_wrong_password_and_a_user_without_permission_are_refused_clearly(
    server: LocalServer, settings: Settings
) -> None:
    user = f"t{secrets.token_hex(4)}"
    client = redis.Redis(port=server.port)
    client.acl_setuser(user, enabled=True, passwords=["+right"], keys=["*"], commands=["+ping"])
    try:
        env = settings_env(settings)
        wrong = f"redis://{user}:wrong@127.0.0.1:{server.port}/0"
        done = flowbus("worker", "tests.workers.apps:steps", "--redis-url", wrong, env=env)
        assert_fails_clearly(done, 1, "authentication failed", f"{user}:***@")
        assert "wrong@" not in done.stderr  # the password is never shown
        assert "is the server running" not in done.stderr  # it is: it refused us
        weak = f"redis://{user}:right@127.0.0.1:{server.port}/0"
        done = flowbus("worker", "tests.workers.apps:steps", "--redis-url", weak, env=env)
        assert_fails_clearly(done, 1, "not permitted")
        client.acl_setuser(user, enabled=True, commands=["+@all", "-hset"], reset_keys=False)
        done = flowbus("worker", "tests.workers.apps:steps", "--redis-url", weak, env=env)
        assert_fails_clearly(done, 1, "not permitted: NOPERM", "'hset'")  # registering itself
    finally:
        client.acl_deluser(user)
        client.close()


def test_simulate_without_the_sample_services_says_which_to_start(settings: Settings) -> None:
    done = flowbus("simulate", "--calls", "1", "--wait", "0.3", env=settings_env(settings))
    assert_fails_clearly(
        done, 1, "no worker of actions, crm is running after 0.3s", "workers.sample:actions"
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["inspect", "session", "a b"], "invalid session id 'a b': whitespace"),
        (["inspect", "sessions", "--limit", "0"], "--limit must be at least 1, not 0"),
        (["simulate", "--concurrency", "0"], "--concurrency at least 1, --wait 0 or more"),
        (["simulate", "--wait", "-5"], "least 1, --wait 0 or more"),
        (["simulate", "--rate", "1e-320"], "--rate at least 1e-300"),
        (["demo", "--keep"], "--keep leaves the embedded server running; with --redis-url"),
        (["simulate", "--barge-in-every", "-1"], "--barge-in-every: 0 or more is needed, not -1"),
        (["demo", "--barge-in-every", "one"], "a whole number is needed, not 'one'"),
    ],
    ids=[
        "session-id",
        "limit",
        "simulate-concurrency",
        "simulate-wait",
        "simulate-rate",
        "demo-keep",
        "simulate-barge-in",
        "demo-barge-in",
    ],
)
def test_a_command_given_a_bad_value_says_which(
    settings: Settings, args: list[str], says: str
) -> None:
    assert_fails_clearly(flowbus(*args, env=settings_env(settings)), 2, says)


def test_a_port_that_speaks_no_redis_and_a_database_out_of_range_are_said_plainly(
    server: LocalServer,
) -> None:
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        url = f"redis://127.0.0.1:{web.server_address[1]}/0"
        done = flowbus("inspect", "groups", "--redis-url", url)
        assert_fails_clearly(done, 1, "is not a Redis server", "is the port right?", url)
    finally:
        web.shutdown()
        web.server_close()
    done = flowbus("inspect", "groups", "--redis-url", f"redis://127.0.0.1:{server.port}/99")
    assert_fails_clearly(done, 1, "the server refused us: DB index is out of range", "/99")


def test_a_reader_that_goes_away_ends_the_command_quietly(settings: Settings) -> None:
    """As ``flowbus dead list | head -1`` does once head has its line."""
    with subprocess.Popen(
        [sys.executable, "-m", "workers", "inspect", "owners"],
        cwd=ROOT,
        env={**os.environ, **settings_env(settings)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before it writes
        stderr = proc.stderr.read().decode()
        assert proc.wait(60) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_server_that_wants_a_password_not_given_says_so() -> None:
    with LocalServer(KIND) as server:
        admin = redis.Redis(port=server.port)
        admin.config_set("requirepass", "secret")
        try:
            url = f"redis://127.0.0.1:{server.port}/0"
            done = flowbus("inspect", "groups", "--redis-url", url)
            assert_fails_clearly(done, 1, "the server wants a password: give it in the URL")
        finally:
            redis.Redis(port=server.port, password="secret").config_set("requirepass", "")
            admin.close()


def test_end_idle_for_a_huge_number_of_seconds_finds_no_session_without_a_traceback(
    settings: Settings,
) -> None:
    """1e308 seconds is finite, but not once made milliseconds: nothing is idle that long."""
    done = flowbus("end", "--idle-for", "1e308", "--dry-run", env=settings_env(settings))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip() == "no session idle that long"


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--lease-ttl", "1e300"], {}, "lease_ttl_seconds must be at most 1e+09"),
        ([], {"FLOWBUS_LEASE_TTL_SECONDS": "1e12"}, "set by --lease-ttl or FLOWBUS_LEASE_TTL"),
    ],
    ids=["lease-ttl", "env-lease-ttl"],
)
def test_a_worker_given_a_duration_the_server_cannot_take_refuses_to_start(
    settings: Settings, args: list[str], env: dict[str, str], says: str
) -> None:
    """Not a worker that runs on, owning nothing, logging acquire_failed 5 times a second."""
    done = flowbus(
        "worker",
        "tests.workers.apps:steps",
        *args,
        env={**settings_env(settings), **env},
        timeout=30,
    )
    assert_fails_clearly(done, 2, says)


def test_a_misspelt_variable_is_named_with_what_it_may_have_meant() -> None:
    done = flowbus("inspect", "--help", env={"FLOWBUS_LEASE_TTL": "2", "FLOWBUS_PREFIXX": "a"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "flowbus: FLOWBUS_LEASE_TTL is not a flowbus variable, and is ignored "
        "(did you mean FLOWBUS_LEASE_TTL_SECONDS?)",
        "flowbus: FLOWBUS_PREFIXX is not a flowbus variable, and is ignored "
        "(did you mean FLOWBUS_PREFIX?)",
    ]
    assert flowbus("inspect", "--help", env={"FLOWBUS_PREFIX": "a"}).stderr == ""


def test_no_cluster_overrides_the_environments_and_empty_variables_are_unset(
    settings: Settings,
) -> None:
    env = {**settings_env(settings), "FLOWBUS_CLUSTER": "1"}
    env |= {"FLOWBUS_LOG_LEVEL": "", "FLOWBUS_LOG_FORMAT": "", "FLOWBUS_PARTITIONS": ""}
    done = flowbus("inspect", "groups", "--no-cluster", env=env)
    assert done.returncode == 0, done.stderr
    done = flowbus("inspect", "groups", env=env)  # told of a cluster, found a single server
    assert_fails_clearly(done, 1, "the server is not a cluster's node (")


def test_a_worker_still_connecting_stops_at_a_signal_with_its_status(tmp_path: Path) -> None:
    """It listens for signals from the start: as PID 1 in a container a process with no
    handler would not even hear SIGTERM, and `docker compose stop` waited out its grace."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there: it retries
    options = ["--redis-url", url, "--connect-attempts", "1000", "--log-format", "json"]
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "worker", "tests.workers.apps:steps", *options],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while b"connect_retried" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # polls the log; the condition is the line above
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM  # not killed by it (-15)
    finally:
        proc.kill()
        proc.wait()
    assert b"worker_stopped_connecting" in log.read_bytes()


def test_the_barge_in_options_default_is_the_simulated_calls_own() -> None:
    for command in ("demo", "simulate"):
        assert parser().parse_args([command]).barge_in_every == BARGE_IN_EVERY
