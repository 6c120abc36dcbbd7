import io
import json

import structlog

from infra.logging import configure_logging, redact


def test_secret_keys_and_url_passwords_are_redacted():
    assert redact({"api_key": "k", "nested": {"password": "p", "ok": 1}}) == {"api_key": "***", "nested": {"password": "***", "ok": 1}}
    assert redact("amqp://guest:hunter2@host:5672/") == "amqp://guest:***@host:5672/"


def test_json_logs_carry_bound_ids_and_never_the_secret():
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    log = structlog.get_logger("t")
    with structlog.contextvars.bound_contextvars(saga_id="o-1", message_id="m-1"):
        log.info("charged", payment_token="tok_secret", url="postgresql://u:pw@db/x")
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["saga_id"] == "o-1" and line["message_id"] == "m-1" and line["event"] == "charged"
    assert "tok_secret" not in stream.getvalue() and "pw@" not in stream.getvalue()
