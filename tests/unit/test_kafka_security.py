"""Kafka security settings -> kafka-python, aiokafka and Faust client settings, from one place.

The live TLS/mTLS check is tests/integration/test_kafka_security_live.py. SASL cannot be exercised live:
Tansu 0.6 verifies SCRAM-SHA-256/512 (``--authentication``), but on an authenticating broker with memory
storage no first user can be created (creating one needs an authenticated connection, and PLAIN is not
enabled: NoSharedMechanism), so SASL is pinned here, including against Faust's and aiokafka's own
translation of the same credentials.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient
from pydantic import SecretStr

from connectors import kafka_security as ks
from connectors.kafka_security import PLAINTEXT, KafkaSecurity, KafkaSecurityError
from pipeline.settings import Settings
from tests.integration.tls_front import Pki, make_pki

PASSWORD = "pw-Zq8vT3-never-print-me"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _clean_registry():
    ks.clear_registry()
    yield
    ks.clear_registry()


def sasl(protocol: str = "SASL_PLAINTEXT", mechanism: str = "SCRAM-SHA-512", **kw) -> KafkaSecurity:
    return KafkaSecurity(protocol, mechanism, username="iotad", password=SecretStr(PASSWORD), **kw)


def test_plaintext_adds_nothing() -> None:
    """The default leaves every client's configuration exactly as it was."""
    assert PLAINTEXT.kafka_python() == {}
    assert PLAINTEXT.aiokafka() == {}
    assert PLAINTEXT.faust_credentials() is None
    assert PLAINTEXT.ssl_context() is None
    assert KafkaSecurity.from_settings(Settings()) == PLAINTEXT


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_kwargs(mechanism: str) -> None:
    sec = sasl(mechanism=mechanism)
    expected = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "iotad",
        "sasl_plain_password": PASSWORD,
    }
    assert sec.kafka_python() == expected
    assert sec.aiokafka() == expected
    creds = sec.faust_credentials()
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism.value) == ("iotad", PASSWORD, mechanism)
    # Faust's own translation of the credentials gives the aiokafka clients the same settings.
    assert {k: v for k, v in credentials_to_aiokafka_auth(creds).items() if v is not None} == expected


def test_sasl_ssl_and_ssl_share_one_verified_context(pki: Pki) -> None:
    sec = sasl("SASL_SSL", "SCRAM-SHA-256", cafile=str(pki.ca))
    kw = sec.aiokafka()
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-256"
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    creds = sec.faust_credentials()
    assert isinstance(creds, faust.SASLCredentials) and creds.protocol.value == "SASL_SSL"
    assert credentials_to_aiokafka_auth(creds)["security_protocol"] == "SASL_SSL"

    tls = KafkaSecurity("SSL", cafile=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key))
    assert set(tls.kafka_python()) == {"security_protocol", "ssl_context"}
    creds = tls.faust_credentials()
    assert isinstance(creds, faust.SSLCredentials)
    assert credentials_to_aiokafka_auth(creds)["security_protocol"] == "SSL"
    assert isinstance(credentials_to_aiokafka_auth(creds)["ssl_context"], ssl.SSLContext)


def test_hostname_check_can_be_turned_off_but_never_verification(pki: Pki) -> None:
    ctx = KafkaSecurity("SSL", cafile=str(pki.ca), check_hostname=False).ssl_context()
    assert ctx is not None and not ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "SASL_SASL"}, "kafka_security_protocol"),
        ({"protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "username": "u", "password": PASSWORD}, "mechanism"),
        ({"protocol": "SASL_PLAINTEXT", "username": "u"}, "needs kafka_sasl_username and kafka_sasl_password"),
        ({"protocol": "SASL_PLAINTEXT", "password": PASSWORD}, "needs kafka_sasl_username and kafka_sasl_password"),
        ({"protocol": "SSL", "keyfile": "/x.key"}, "without kafka_ssl_certfile"),
        ({"protocol": "SSL", "cafile": "/nonexistent/ca.pem"}, "no such file"),
    ],
)
def test_inconsistent_settings_are_refused_without_the_password(kwargs: dict, message: str) -> None:
    with pytest.raises(KafkaSecurityError, match=message) as info:
        KafkaSecurity(**kwargs)
    assert PASSWORD not in str(info.value)


def test_the_password_never_prints(caplog: pytest.LogCaptureFixture) -> None:
    sec = sasl("SASL_PLAINTEXT", "PLAIN")
    caplog.set_level(logging.DEBUG)
    sec.kafka_python()  # warns: PLAIN over plaintext
    assert "unencrypted" in caplog.text
    creds = sec.faust_credentials()
    for text in (repr(sec), str(sec), sec.describe(), repr(creds), caplog.text):
        assert PASSWORD not in text
    assert "iotad" in sec.describe() and "SCRAM" not in sec.describe()


def test_real_clients_accept_the_kwargs(pki: Pki) -> None:
    for sec in (sasl(), sasl("SASL_SSL", cafile=str(pki.ca)), KafkaSecurity("SSL", cafile=str(pki.ca))):
        kw = sec.kafka_python()
        for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
            assert set(kw) <= set(client.DEFAULT_CONFIG), client

        async def construct(kw: dict = sec.aiokafka()) -> None:
            producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **kw)
            consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", **kw)
            assert producer.client._security_protocol == kw["security_protocol"]
            assert consumer._client._security_protocol == kw["security_protocol"]
            await producer.stop()
            await consumer.stop()

        asyncio.run(construct())


def test_settings_and_faust_app(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """IOTAD_KAFKA_* (password from a mounted file) -> create_app's Faust app carries the credentials."""
    secret = tmp_path / "kafka_password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.chdir(tmp_path)  # no stray .env
    for k, v in {
        "IOTAD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "IOTAD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "IOTAD_KAFKA_SASL_USERNAME": "iotad",
        "IOTAD_KAFKA_SASL_PASSWORD_FILE": str(secret),
        "IOTAD_KAFKA_SSL_CAFILE": str(pki.ca),
        "IOTAD_KAFKA_BOOTSTRAP": "broker-1:9093,broker-2:9093",
        "IOTAD_DATA_DIR": str(tmp_path / "data"),
        "IOTAD_METRICS_PORT": "0",
    }.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    sec = KafkaSecurity.from_settings(settings)
    assert sec.password.get_secret_value() == PASSWORD and sec.cafile == str(pki.ca)

    from pipeline.app import create_app

    comp = create_app(settings)
    creds = comp.app.conf.broker_credentials
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism.value) == ("iotad", PASSWORD, "SCRAM-SHA-256")
    assert creds.protocol.value == "SASL_SSL"
    # ... and the worker's other Kafka clients (control topic) resolve to the same security.
    assert ks.security_for("BROKER-2:9093, broker-1:9093") == sec
    assert ks.security_for("elsewhere:9092") == PLAINTEXT


def test_registry_is_per_cluster() -> None:
    sec = sasl()
    ks.register("a:9092,b:9092", sec)
    assert ks.security_for(" b:9092 ,A:9092") is sec
    assert ks.security_for(["a:9092", "b:9092"]) is sec
    assert ks.security_for("127.0.0.1:9092") is PLAINTEXT  # e.g. the embedded local stack
    assert ks.security_for("a:9092,b:9092", PLAINTEXT) is PLAINTEXT  # explicit wins
    ks.register("a:9092,b:9092", PLAINTEXT)
    assert ks.security_for("a:9092,b:9092") is PLAINTEXT


def test_cli_registers_its_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipeline.cli import _settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IOTAD_KAFKA_BOOTSTRAP", "kafka.example:9093")
    monkeypatch.setenv("IOTAD_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("IOTAD_KAFKA_SASL_USERNAME", "iotad")
    monkeypatch.setenv("IOTAD_KAFKA_SASL_PASSWORD", PASSWORD)
    _settings()
    assert ks.security_for("kafka.example:9093").kafka_python()["sasl_plain_password"] == PASSWORD
