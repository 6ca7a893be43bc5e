"""The console's pure parts: escaping, charts, sealed sessions, the drift flag, progress."""

from __future__ import annotations

import html
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.console.charts import Series, Span, line_chart
from cloud.console.fleet import drift_reasons
from cloud.console.markup import Markup, esc, tag
from cloud.console.rollouts import progress
from cloud.console.sessions import SESSION_TTL_S, SessionSeal, clean_token
from protos.autoglm.v1 import agent_pb2, operator_pb2

pytestmark = pytest.mark.unit


@given(st.text())
def test_escaped_text_is_inert_and_reads_back_the_same(text: str) -> None:
    escaped = esc(text)
    assert "<" not in escaped and ">" not in escaped and '"' not in escaped
    assert html.unescape(escaped) == text
    assert esc(escaped) == escaped  # Markup is not escaped twice


@given(st.text(), st.text())
def test_tags_escape_children_and_attributes(child: str, attr: str) -> None:
    built = tag("td", child, title=attr, data_x=attr)
    assert built.startswith("<td title=") and built.endswith("</td>")
    inner = built[built.index(">") + 1 : -len("</td>")]
    assert html.unescape(inner) == child
    assert built.count("<") == 2 and built.count(">") == 2


def test_markup_children_stay_as_built() -> None:
    assert tag("p", Markup("<b>x</b>"), "<i>") == "<p><b>x</b>&lt;i&gt;</p>"
    assert tag("input", required=True, hidden=False, value=None) == "<input required>"


def test_charts_draw_points_a_threshold_and_a_span() -> None:
    chart = line_chart(
        "score",
        [Series("pump-1", [(1000.0, 0.2), (1010.0, 1.4), (1020.0, 0.9)]), Series("none", [])],
        threshold=1.0,
        span=Span(1005.0, 1015.0, "the alert"),
    )
    assert chart.count("<polyline") == 1 and 'data-points="3"' in chart
    assert 'class="threshold"' in chart and 'class="span"' in chart
    assert "<title>the alert</title>" in chart
    single = line_chart("one", [Series("x", [(5.0, 0.0)])])
    assert 'data-points="1"' in single  # one window still shows (a dot), flat data too
    assert "no data" in line_chart("empty", [Series("x", [])])
    evil = line_chart('<script>"', [Series("<img>", [(0.0, 1.0), (1.0, 2.0)])])
    assert "<script>" not in evil and "<img>" not in evil


def test_sessions_open_only_what_was_sealed_and_expire() -> None:
    seal = SessionSeal(b"key material of one control plane")
    session, cookie = seal.new("agt_op_secret")
    assert "agt_op_secret" not in cookie
    assert seal.open(cookie) == session
    assert session.csrf_ok(session.csrf) and not session.csrf_ok("") and not session.csrf_ok("x")
    assert SessionSeal(b"another control plane").open(cookie) is None
    assert seal.open(cookie[:-2] + "AA") is None
    assert seal.open(None) is None and seal.open("") is None and seal.open("x" * 5000) is None
    stale = seal._fernet.encrypt_at_time(b'{"t": "a", "c": "b"}', int(time.time()) - 2 * 86400)
    assert SESSION_TTL_S < 2 * 86400 and seal.open(stale.decode()) is None
    not_a_session = seal._fernet.encrypt(b'["t", "c"]').decode()
    assert seal.open(not_a_session) is None


def test_pasted_tokens_are_cleaned() -> None:
    assert clean_token("  Bearer agt_op_abc \n") == "agt_op_abc"
    assert clean_token("agt_op_abc") == "agt_op_abc"
    for bad in ("", "   ", "a b", "x" * 300, "agt\x00op"):
        assert clean_token(bad) == ""


def test_the_drift_flag_names_its_reasons() -> None:
    quiet = agent_pb2.AssetDrift(input_shift=1.0, spread_ratio=1.2, score_median=0.3)
    assert drift_reasons("pump-1", quiet) == []
    moved = agent_pb2.AssetDrift(
        input_shift=4.2, input_shift_sensor="flow", spread_ratio=2.5, masked_fraction=0.3,
        score_median=0.85,
    )  # fmt: skip
    reasons = drift_reasons("pump-1", moved)
    assert len(reasons) == 4 and "inputs shifted 4.2 sd (flow)" in reasons[0]


def test_rollout_progress_counts_updated_devices() -> None:
    rollout = operator_pb2.Rollout(
        waves=[
            operator_pb2.RolloutWave(target_devices=1),
            operator_pb2.RolloutWave(target_devices=2),
        ],
        devices=[
            operator_pb2.RolloutDevice(state="updated"),
            operator_pb2.RolloutDevice(state="installing"),
            operator_pb2.RolloutDevice(state="waiting"),
        ],
    )
    assert progress(rollout) == (1, 3, 33)
    for d in rollout.devices:
        d.state = "updated"
    assert progress(rollout) == (3, 3, 100)
    assert progress(operator_pb2.Rollout()) == (0, 0, 0)


def test_console_listen_is_checked_like_the_other_ports(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from cloud.config import CloudConfig

    assert CloudConfig(state_dir=tmp_path).console_listen == ""  # off unless asked
    assert CloudConfig(state_dir=tmp_path, console_listen="127.0.0.1:0").console_listen
    with pytest.raises(ValidationError, match="HOST:PORT"):
        CloudConfig(state_dir=tmp_path, console_listen="8080")


def test_a_timeline_around_the_calendar_ends_does_not_overflow() -> None:
    import datetime as dt

    from google.protobuf.timestamp_pb2 import Timestamp

    from cloud.console.alerts import AROUND
    from cloud.console.context import moved

    first = dt.datetime(1, 1, 1, 0, 0, 30, tzinfo=dt.UTC)
    # Past an end of the calendar: that end (it used to be `at` itself, not moved at all).
    assert moved(first, -AROUND) == dt.datetime.min.replace(tzinfo=dt.UTC)
    assert moved(first, AROUND) == first + AROUND
    last = dt.datetime(9999, 12, 31, 23, 59, 0, tzinfo=dt.UTC)
    assert moved(last, AROUND) == dt.datetime.max.replace(tzinfo=dt.UTC)
    assert moved(last, -AROUND) == last - AROUND
    for end in (moved(first, -AROUND), moved(last, AROUND)):
        Timestamp().FromDatetime(end)  # what the console asks the API with
    # A chart whose points all sit at the calendar's end draws (its padding is unlabelled).
    end = last.timestamp()
    chart = line_chart("score", [Series("s", [(end, 1.0), (end, 2.0)])], threshold=1.0)
    assert "<svg" in chart
