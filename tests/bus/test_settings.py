from __future__ import annotations

import pytest

from bus import ConfigError, Settings


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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLOWBUS_PARTITIONS": "many"}, "invalid setting"),
        ({"FLOWBUS_PARTITIONS": "0"}, "partitions must be within"),
        ({"FLOWBUS_PREFIX": "has space"}, "prefix"),
        ({"FLOWBUS_DEAD_LETTER_POLICY": "drop"}, "invalid setting"),
        ({"FLOWBUS_ACK_MODE": "never"}, "invalid setting.*ack_mode"),
        ({"FLOWBUS_LEASE_TTL_SECONDS": "-1"}, "lease_ttl_seconds must be positive"),
        ({"FLOWBUS_READ_BATCH": "0"}, "read_batch must be at least 1, not 0"),
        ({"FLOWBUS_CONCURRENCY": "0"}, "concurrency must be at least 1, not 0"),
    ],
)
def test_bad_values_are_config_errors_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_ack_mode_is_each_unless_batch_is_asked_for() -> None:
    assert Settings().ack_mode == "each"
    assert Settings.from_env({"FLOWBUS_ACK_MODE": "batch"}).ack_mode == "batch"
    with pytest.raises(ConfigError, match="ack_mode must be 'each' or 'batch'"):
        Settings(ack_mode="later")  # type: ignore[arg-type]


def test_the_password_never_shows() -> None:
    assert Settings(url="redis://app:s3cret@h:6379/0").redacted_url == "redis://app:***@h:6379/0"
