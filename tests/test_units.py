"""Unit tests of the small contract pieces: settings, backoff, selectors, errors, durations."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cloud.cli.output import parse_duration, parse_labels
from cloud.config import CloudConfig
from cloud.domain import validate_labels
from cloud.selectors import matches, parse_selector
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.errors import (
    ConfigError,
    InvalidInput,
    PermissionDenied,
    Unavailable,
    from_rpc_error,
)
from edge_agent.retry import Backoff
from edge_agent.settings import load_settings

pytestmark = pytest.mark.unit


def test_unknown_config_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("state_dir: /tmp/x\nreconect:\n  max_s: 3\n")
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert "reconect" in str(err.value) and str(path) in str(err.value)


def test_mistyped_nested_key_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("state_dir: /tmp/x\nreconnect:\n  max_s: soon\n")
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert "reconnect.max_s" in str(err.value) and "soon" in str(err.value)


def test_a_bad_environment_override_is_blamed_on_the_variable_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("state_dir: /tmp/x\nmqtt:\n  port: 1883\n")
    monkeypatch.setenv("AUTOGLM_EDGE_MQTT__PORT", "abc")
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    message = str(err.value)
    assert message.startswith("environment (AUTOGLM_EDGE_MQTT__PORT): key 'mqtt.port'"), message
    assert str(path) not in message


@pytest.mark.parametrize(
    ("topics", "prefix", "why"),
    [
        (["plant/#/pump"], "site", "'#' must be a whole level"),
        (["plant/pump+"], "site", "'+' must be a whole level"),
        ([""], "site", "empty"),
        (["plant/+"], "site/+", "no wildcards"),
        (["plant/+"], "", "empty"),
    ],
)
def test_mqtt_topics_are_checked_when_the_config_loads(
    tmp_path: Path, topics: list[str], prefix: str, why: str
) -> None:
    """A subscription the broker would refuse used to end ingest at run time with a
    traceback while the agent still looked online."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path),
                "mqtt": {"alert_prefix": prefix},
                "assets": [{"name": "pump-1", "topics": topics}],
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert why in str(err.value) and str(path) in str(err.value), err.value


def test_an_empty_model_bundle_is_named_not_taken_for_the_current_directory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"state_dir: {tmp_path}\nmodel:\n  bundle: ''\n")
    with pytest.raises(ConfigError, match=r"model\.bundle.*is empty") as err:
        load_agent_config(path)
    assert str(path) in str(err.value)


def test_garbage_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("state_dir: /tmp/x\ncloud: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_agent_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_agent_config(path)


def test_environment_overrides_file_and_flags_override_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("state_dir: /from/file\nreconnect:\n  max_s: 5\n")
    monkeypatch.setenv("AUTOGLM_EDGE_RECONNECT__MAX_S", "7")
    monkeypatch.setenv("AUTOGLM_EDGE_STATE_DIR", "/from/env")
    config = load_agent_config(path, {"state_dir": Path("/from/flag")})
    assert isinstance(config, AgentConfig)
    assert config.reconnect.max_s == 7
    assert config.state_dir == Path("/from/flag")


def test_cloud_config_rejects_bad_listen_address() -> None:
    with pytest.raises(ConfigError, match="api_listen"):
        load_settings(CloudConfig, None, {"state_dir": "/x", "api_listen": "nohostport"})


@given(
    initial=st.floats(0.01, 5),
    ratio=st.floats(1, 100),
    multiplier=st.floats(1, 4),
    jitter=st.floats(0, 0.9),
    seed=st.integers(0, 2**32),
)
def test_backoff_stays_within_jittered_bounds(
    initial: float, ratio: float, multiplier: float, jitter: float, seed: int
) -> None:
    maximum = initial * ratio
    backoff = Backoff(initial, maximum, multiplier, jitter, rng=random.Random(seed))
    for attempt in range(30):
        base = min(maximum, initial * multiplier**attempt)
        delay = backoff.next_delay()
        assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9
    backoff.reset()
    assert backoff.next_delay() <= initial * (1 + jitter) + 1e-9


def test_backoff_exhaust_jumps_to_the_maximum() -> None:
    backoff = Backoff(1, 60, 2, 0)
    backoff.exhaust()
    assert backoff.next_delay() == 60


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(5, 1)


labels_strategy = st.dictionaries(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_. ", max_size=10).map(str.strip),
    max_size=5,
)


@given(labels=labels_strategy)
def test_selector_round_trip(labels: dict[str, str]) -> None:
    text = ",".join(f"{k}={v}" for k, v in labels.items())
    assert parse_selector(text).equalities() == labels
    assert matches(labels | {"extra": "x"}, parse_selector(text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["a", "b", "c", "d"]),
        ("site=a", ["a", "b"]),
        ("site==a", ["a", "b"]),
        ("site!=plant-a", ["a", "b", "c", "d"]),
        ("site!=a", ["c", "d"]),
        ("site in (a, b)", ["a", "b", "c"]),
        ("site notin (a,b)", ["d"]),
        ("line", ["b", "c"]),
        ("!line", ["a", "d"]),
        ("site=a,line", ["b"]),
        ("site in (a,b),line!=2", ["a", "c"]),
    ],
)
def test_selectors_follow_kubernetes(text: str, expected: list[str]) -> None:
    devices = {
        "a": {"site": "a"},
        "b": {"site": "a", "line": "2"},
        "c": {"site": "b", "line": "3"},
        "d": {},
    }
    selector = parse_selector(text)
    assert [n for n, labels in devices.items() if matches(labels, selector)] == expected


def test_bad_selector_and_labels_are_clear() -> None:
    for bad in ("site=a=b", "site in a", "site in ()", "tier in (a,b", "a)", "=x", "k~v"):
        with pytest.raises(InvalidInput, match="selector"):
            parse_selector(bad)
    with pytest.raises(InvalidInput, match="label key"):
        validate_labels({"bad key": "x"})
    with pytest.raises(ValueError, match="key=value"):
        parse_labels(["novalue"])


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("24h") == 86_400
    for bad in ("", "-5m", "soon", "49711d", "1e30d", "4294967296"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_duration("4294967295") == 2**32 - 1  # the API's uint32 seconds


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_rpc_errors_map_back_to_the_hierarchy() -> None:
    denied = from_rpc_error(_FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "revoked"), "cp:1")
    assert isinstance(denied, PermissionDenied) and denied.exit_code == 6
    tls = from_rpc_error(
        _FakeRpcError(
            grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED"
        ),
        "cp:1",
    )
    assert isinstance(tls, Unavailable) and "not signed by the CA" in str(tls)
    assert "cp:1" in str(tls)


@pytest.mark.parametrize(
    ("details", "cause"),
    [
        ("Custom verification check failed: Hostname Verification Check failed.", "does not name"),
        ("ipv4:127.0.0.1:45581: Socket closed", "needs a client certificate"),
        ("Stream removed (Socket closed)", "dropped during the call"),
        ("Failed to create security handshaker.", "PEM certificate"),
        ("SSL_ERROR_SSL: error:1000007d: CERTIFICATE_VERIFY_FAILED", "not signed by the CA"),
        ("failed to connect to all addresses; Connection refused", "nothing is listening"),
    ],
)
def test_transport_failures_name_their_real_cause(details: str, cause: str) -> None:
    error = from_rpc_error(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), "cp:1")
    assert cause in str(error), str(error)


@pytest.mark.parametrize(
    ("details", "peers"),
    [
        ("CANCELLED", True),  # core dropped a call the busy server never took (test_dropped_calls)
        ("Locally cancelled by application!", False),
        ("Channel closed!", False),
        ("Cancelled upon garbage collection!", False),
    ],
)
def test_a_cancelled_call_is_the_peers_doing_only_when_this_process_did_not_cancel_it(
    details: str, peers: bool
) -> None:
    error = from_rpc_error(_FakeRpcError(grpc.StatusCode.CANCELLED, details), "cp:1")
    assert isinstance(error, Unavailable) is peers, repr(error)
    assert ("ended the call without an answer" in str(error)) is peers, str(error)
    assert details in str(error) and (not peers or "cp:1" in str(error)), str(error)


def test_a_write_on_a_call_that_ended_is_explained_other_internal_errors_are_not() -> None:
    ended = from_rpc_error(
        _FakeRpcError(grpc.StatusCode.INTERNAL, "Internal error from Core"), "cp:1"
    )
    assert isinstance(ended, Unavailable), repr(ended)
    assert "cp:1" in str(ended) and "ended while this side was sending" in str(ended), str(ended)
    other = from_rpc_error(_FakeRpcError(grpc.StatusCode.INTERNAL, "incident 7f3a"), "cp:1")
    assert not isinstance(other, Unavailable) and str(other) == "incident 7f3a", repr(other)
    # The same words sent by a server (a proxy passing on its own failure) are its answer;
    # gRPC's debug string tells them apart (sync gRPC's, grpc.aio's, grpc.aio's own write).
    for debug, received in (
        ("UNKNOWN:Error received from peer ipv4:10.0.0.1:7443 {grpc_status:13}", True),
        ("INTERNAL:Internal error from Core", True),
        ('Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation>,)', False),
    ):
        error = _FakeRpcError(grpc.StatusCode.INTERNAL, "Internal error from Core")
        error.debug_error_string = lambda debug=debug: debug  # type: ignore[attr-defined]
        mapped = from_rpc_error(error, "cp:1")
        assert isinstance(mapped, Unavailable) is not received, (debug, repr(mapped))


def test_json_output_uses_the_tables_words_and_real_numbers() -> None:
    from cloud.cli.output import json_view
    from protos.autoglm.v1 import operator_pb2

    alert = operator_pb2.Alert(
        id="a1", state=operator_pb2.Alert.STATE_FIRING, revision=2**40, raised_events=3
    )
    alert.top_sensors.add(sensor="flow", contribution=0.5)
    alert.first_seen.FromSeconds(1_700_000_000)
    view = json_view(alert)
    assert view["state"] == "firing"
    assert view["revision"] == 2**40 and view["raised_events"] == 3
    assert view["top_sensors"] == [{"sensor": "flow", "contribution": 0.5}]
    assert view["first_seen"] == "2023-11-14T22:13:20Z"


@pytest.mark.parametrize(
    ("candidate", "incumbent", "fails"),
    [
        (1.6, 0.5, False),  # 3.2x, but 1.1 ms: scheduling noise on a busy device
        (6.0, 2.0, False),  # 3x, 4 ms slower: still under the floor
        (30.0, 10.0, True),  # 3x and 20 ms slower: a real regression
        (15.0, 10.0, False),  # 5 ms slower, within the 2x ratio
        (9.0, 0.0, False),  # nothing measured for the incumbent
    ],
)
def test_the_latency_gate_has_an_absolute_floor(
    candidate: float, incumbent: float, fails: bool
) -> None:
    from cloud.rollout_rules import latency_regression

    why = latency_regression(candidate, incumbent, 2.0)
    assert bool(why) is fails, why
    if fails:
        assert "ms" in why and "ratio" in why
