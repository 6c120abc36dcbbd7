import io
import json

import structlog

from infra.logging import configure_logging, redact


def test_secret_keys_and_url_passwords_are_redacted():
    assert redact({"api_key": "k", "nested": {"password": "p", "ok": 1}}) == {
        "api_key": "***",
        "nested": {"password": "***", "ok": 1},
    }
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


def test_a_url_password_with_an_empty_user_or_an_at_sign_is_redacted_whole():
    assert redact("redis://:hunter2@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact("rediss://default:s3cr3t@cache:6380") == "rediss://default:***@cache:6380"
    assert redact("postgresql://u:p@ss@db/x") == "postgresql://u:***@db/x"
    assert redact({"url": "retrying redis://:hunter2@cache after amqp://g:pw@mq/"}) == {
        "url": "retrying redis://:***@cache after amqp://g:***@mq/"
    }


def test_secret_query_parameters_and_keywords_are_redacted():
    assert redact("postgresql://db/x?user=u&password=hunter2&sslmode=require") == (
        "postgresql://db/x?user=u&password=***&sslmode=require"
    )
    assert redact("http://h/x?password=hunter2") == "http://h/x?password=***"
    assert redact("https://h/?a=1&api_key=k1&access_token=t1#frag") == "https://h/?a=1&api_key=***&access_token=***#frag"
    assert redact("host=db password=hunter2 user=u") == "host=db password=*** user=u"
    assert redact("http://h/x?user=u&sslmode=require") == "http://h/x?user=u&sslmode=require"


def test_no_password_survives_in_a_log_line():
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    structlog.get_logger("t").warning("redis.down", url="redis://:hunter2@cache:6379/0", dsn="postgresql://db/x?password=hunter3")
    assert "hunter2" not in stream.getvalue() and "hunter3" not in stream.getvalue()
