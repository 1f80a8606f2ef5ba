from __future__ import annotations

import re

import pytest

from bus import Codec, ConfigError, Delivery, Service, Settings
from bus.settings import VARIABLES


def test_environment_variables_fill_the_settings_and_explicit_values_win() -> None:
    env = {
        "FLOWBUS_REDIS_URL": "redis://h:1/2",
        "FLOWBUS_PARTITIONS": "16",
        "FLOWBUS_LEASE_TTL_SECONDS": "2.5",
        "FLOWBUS_DEAD_LETTER_POLICY": "pause",
    }
    s = Settings.from_env(env, partitions=8, prefix=None)
    assert (s.url, s.partitions, s.lease_ttl_seconds, s.dead_letter_policy, s.prefix) == (
        "redis://h:1/2",
        8,
        2.5,
        "pause",
        "flowbus",
    )


def test_an_empty_variable_is_unset() -> None:
    """As a compose file's ``FLOWBUS_PREFIX: ${PREFIX:-}`` leaves it when PREFIX is not set."""
    assert Settings.from_env(dict.fromkeys(VARIABLES.values(), "")) == Settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLOWBUS_PARTITIONS": "many"}, "FLOWBUS_PARTITIONS='many': must be an integer"),
        ({"FLOWBUS_PARTITIONS": "0"}, "partitions must be within"),
        ({"FLOWBUS_PREFIX": "has space"}, "prefix"),
        ({"FLOWBUS_DEAD_LETTER_POLICY": "drop"}, "FLOWBUS_DEAD_LETTER_POLICY='drop': must be one"),
        ({"FLOWBUS_ACK_MODE": "never"}, "FLOWBUS_ACK_MODE='never': must be one of 'each', 'b"),
        ({"FLOWBUS_CLUSTER": "yes"}, "FLOWBUS_CLUSTER='yes': must be true or false"),
        ({"FLOWBUS_LEASE_TTL_SECONDS": "-1"}, "lease_ttl_seconds must be at least 0.1, not -1"),
        ({"FLOWBUS_LEASE_TTL_SECONDS": "nan"}, "lease_ttl_seconds must be a finite number"),
        ({"FLOWBUS_RETENTION_SECONDS": "inf"}, "retention_seconds must be a finite number"),
        ({"FLOWBUS_READ_BATCH": "0"}, "read_batch must be at least 1, not 0"),
        ({"FLOWBUS_CONCURRENCY": "0"}, "concurrency must be at least 1, not 0"),
    ],
)
def test_bad_values_are_config_errors_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


#: A value each variable refuses, whatever the other settings are.
BAD_VALUES = {
    "FLOWBUS_REDIS_URL": "redis://app:s3cret@h:6379/zero",
    "FLOWBUS_CLUSTER": "yes",
    "FLOWBUS_PREFIX": "has space",
    "FLOWBUS_PARTITIONS": "0",
    "FLOWBUS_RETENTION_SECONDS": "0",
    "FLOWBUS_MAX_PAYLOAD_BYTES": "0",
    "FLOWBUS_LEASE_TTL_SECONDS": "0.01",
    "FLOWBUS_MAX_DELIVERIES": "0",
    "FLOWBUS_RETRY_BACKOFF_SECONDS": "-1",
    "FLOWBUS_RETRY_BACKOFF_MAX_SECONDS": "-1",
    "FLOWBUS_DEAD_LETTER_POLICY": "drop",
    "FLOWBUS_HANDLER_TIMEOUT_SECONDS": "0",
    "FLOWBUS_CONCURRENCY": "0",
    "FLOWBUS_READ_BATCH": "0",
    "FLOWBUS_ACK_MODE": "never",
    "FLOWBUS_DRAIN_TIMEOUT_SECONDS": "1e12",
    "FLOWBUS_MIN_REPLICAS": "-1",
    "FLOWBUS_REPLICA_TIMEOUT_SECONDS": "0",
}


def test_every_variable_has_a_bad_value_below() -> None:
    assert set(VARIABLES.values()) == BAD_VALUES.keys()


@pytest.mark.parametrize(("name", "value"), BAD_VALUES.items(), ids=list(BAD_VALUES))
def test_a_bad_value_of_any_variable_is_refused_naming_the_variable(name: str, value: str) -> None:
    """An operator reads which variable to change, not only a field's name."""
    with pytest.raises(ConfigError, match=rf"^{name}\b") as refused:
        Settings.from_env({name: value})
    assert "s3cret" not in str(refused.value)  # a URL's password never shows


def test_a_bad_variable_that_an_explicit_value_overrides_is_not_used() -> None:
    assert Settings.from_env({"FLOWBUS_PARTITIONS": "0"}, partitions=8).partitions == 8


def test_ack_mode_is_each_unless_batch_is_asked_for() -> None:
    assert Settings().ack_mode == "each"
    assert Settings.from_env({"FLOWBUS_ACK_MODE": "batch"}).ack_mode == "batch"
    with pytest.raises(ConfigError, match="ack_mode must be 'each' or 'batch'"):
        Settings(ack_mode="later")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"partitions": "64"}, "partitions must be an integer, not '64'"),
        ({"partitions": 2.5}, "partitions must be an integer, not 2.5"),
        ({"url": 5}, "url must be a string, not 5"),
        ({"cluster": 1}, "cluster must be true or false"),
        ({"lease_ttl_seconds": "5"}, "lease_ttl_seconds must be a finite number, not '5'"),
        ({"lease_ttl_seconds": 1e-9}, "lease_ttl_seconds must be at least 0.1"),
        ({"replica_timeout_seconds": 0.0001}, "replica_timeout_seconds must be at least 0.001"),
        ({"retry_backoff_seconds": -1.0}, "retry_backoff_seconds must be 0 or more"),
    ],
)
def test_values_of_the_wrong_type_or_range_given_in_code_are_config_errors(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings(**values)  # type: ignore[arg-type]


def test_the_password_never_shows() -> None:
    assert Settings(url="redis://app:s3cret@h:6379/0").redacted_url == "redis://app:***@h:6379/0"


async def _noop(delivery: Delivery) -> None:
    pass


def test_a_service_takes_any_collection_of_type_names_and_refuses_a_string_or_a_bad_name() -> None:
    service = Service("crm", _noop, Codec([]), subscribes=["a.b", "c.d"])  # type: ignore[arg-type]
    assert service.subscribes == frozenset({"a.b", "c.d"})
    with pytest.raises(ConfigError, match=r"must be a collection of type names, not 'a\.b'"):
        Service("crm", _noop, Codec([]), subscribes="a.b")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a collection of type names"):
        Service("crm", _noop, Codec([]), subscribes=[1])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="service name 'a b' must match"):
        Service("a b", _noop, Codec([]))


def test_a_database_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"the database in url .* must be a number, not 'abc'"):
        Settings(url="redis://:secret@127.0.0.1:6379/abc")
    assert Settings(url="redis://127.0.0.1:6379/3").url.endswith("/3")
