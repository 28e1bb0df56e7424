"""Kafka security settings reach every client; the password never shows outside them.

No broker here speaks SASL or TLS, so the clients are built (kafka-python does not
connect until used when ``api_version`` is given) and their effective config read.
"""

import logging

import pytest

from consumers.kafka import make_consumer, make_producer
from engine.config import KafkaConfig, Settings

SECRET = "s3cr3t-Pa55"


def _sasl() -> KafkaConfig:
    return KafkaConfig(bootstrap_servers="127.0.0.1:1", security_protocol="SASL_SSL",
                       sasl_mechanism="SCRAM-SHA-512", sasl_plain_username="svc",
                       sasl_plain_password=SECRET, ssl_cafile="/etc/ssl/ca.pem")


@pytest.mark.parametrize("make", [
    lambda cfg: make_producer(cfg, api_version=(2, 8)),
    lambda cfg: make_consumer(cfg, "g", api_version=(2, 8)),
    lambda cfg: make_consumer(cfg, None, api_version=(2, 8)),
], ids=["producer", "consumer", "reader"])
def test_every_client_gets_the_security_settings(make):
    client = make(_sasl())
    try:
        got = client.config
        assert got["security_protocol"] == "SASL_SSL"
        assert got["sasl_mechanism"] == "SCRAM-SHA-512"
        assert got["sasl_plain_username"] == "svc" and got["sasl_plain_password"] == SECRET
        assert got["ssl_cafile"] == "/etc/ssl/ca.pem" and got["ssl_check_hostname"] is True
    finally:
        client.close()


def test_plaintext_gives_no_credentials():
    opts = KafkaConfig().client_options()
    assert opts == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}


def test_password_is_masked_everywhere_but_the_clients(monkeypatch, caplog):
    monkeypatch.setenv("LOOKALIKE_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("LOOKALIKE_KAFKA__SASL_PLAIN_PASSWORD", SECRET)
    s = Settings()
    assert s.kafka.client_options()["sasl_plain_password"] == SECRET
    with caplog.at_level(logging.INFO):
        logging.getLogger("lookalike.test").info("settings: %s", s)
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump()), caplog.text):
        assert SECRET not in text
