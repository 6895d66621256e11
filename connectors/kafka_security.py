"""Kafka connection security (TLS, SASL/SCRAM, SASL/PLAIN): the one place that builds client settings.

:class:`KafkaSecurity` holds what the ``IOTAD_KAFKA_SECURITY_PROTOCOL`` / ``IOTAD_KAFKA_SASL_*`` /
``IOTAD_KAFKA_SSL_*`` settings say, validated, and turns it into keyword arguments for each Kafka client
the project uses:

* :meth:`KafkaSecurity.kafka_python` for ``kafka.KafkaProducer`` / ``KafkaConsumer`` / ``KafkaAdminClient``;
* :meth:`KafkaSecurity.aiokafka` for ``aiokafka.AIOKafkaProducer`` / ``AIOKafkaConsumer``;
* :meth:`KafkaSecurity.faust_credentials` for ``faust.App(broker_credentials=...)``.

All three share one TLS policy: an :class:`ssl.SSLContext` made by :meth:`KafkaSecurity.ssl_context`
(``aiokafka.helpers.create_ssl_context``: the CA file, or the system CAs; an optional client certificate
and key for mutual TLS; certificate verification always on, host name check on unless
``IOTAD_KAFKA_SSL_CHECK_HOSTNAME=false``). The default, ``PLAINTEXT``, adds nothing to any client's
configuration, so a PLAINTEXT deployment behaves exactly as before this module existed.

Which security applies to a connection: helpers that take a bootstrap string (``connectors.kafka_admin``,
the simulator's producer, ``pipeline.control``) accept ``security=`` explicitly; without it they use
the security *registered for that bootstrap* with :func:`register` (the CLI registers its settings'
cluster at start-up), and PLAINTEXT for any other cluster, such as the embedded local stack's Tansu.

The SASL password is a :class:`pydantic.SecretStr`: it is unwrapped only inside the client keyword
arguments and never appears in a repr, a log line or an error message of this module.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast, get_args

from pydantic import SecretStr

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

log = logging.getLogger(__name__)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
SECURITY_PROTOCOLS: Final[tuple[str, ...]] = get_args(SecurityProtocol)
SASL_MECHANISMS: Final[tuple[str, ...]] = get_args(SaslMechanism)


class KafkaSecurityError(ValueError):
    """The Kafka security settings are inconsistent (the message never contains a secret)."""


class SecuritySettings(Protocol):
    """The settings :meth:`KafkaSecurity.from_settings` reads (``pipeline.settings.Settings`` has them)."""

    @property
    def kafka_security_protocol(self) -> str: ...
    @property
    def kafka_sasl_mechanism(self) -> str: ...
    @property
    def kafka_sasl_username(self) -> str: ...
    @property
    def kafka_sasl_password(self) -> SecretStr: ...
    @property
    def kafka_ssl_cafile(self) -> Path | None: ...
    @property
    def kafka_ssl_certfile(self) -> Path | None: ...
    @property
    def kafka_ssl_keyfile(self) -> Path | None: ...
    @property
    def kafka_ssl_check_hostname(self) -> bool: ...


def _path(value: str | Path | None) -> str | None:
    return str(value) if value not in (None, "") else None


@dataclass(frozen=True)
class KafkaSecurity:
    """How to connect to one Kafka cluster. Raises :class:`KafkaSecurityError` when inconsistent."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    username: str = ""
    password: SecretStr = field(default=SecretStr(""), repr=False)
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        protocol = str(self.protocol).upper()
        mechanism = str(self.sasl_mechanism).upper()
        object.__setattr__(self, "protocol", protocol)
        object.__setattr__(self, "sasl_mechanism", mechanism)
        if not isinstance(self.password, SecretStr):
            object.__setattr__(self, "password", SecretStr(str(self.password)))
        for name in ("cafile", "certfile", "keyfile"):
            object.__setattr__(self, name, _path(getattr(self, name)))
        if protocol not in SECURITY_PROTOCOLS:
            raise KafkaSecurityError(f"kafka_security_protocol {protocol!r}: expected one of {SECURITY_PROTOCOLS}")
        if self.uses_sasl:
            if mechanism not in SASL_MECHANISMS:
                raise KafkaSecurityError(f"kafka_sasl_mechanism {mechanism!r}: expected one of {SASL_MECHANISMS}")
            if not self.username or not self.password.get_secret_value():
                raise KafkaSecurityError(
                    f"kafka_security_protocol {protocol} needs kafka_sasl_username and kafka_sasl_password "
                    "(IOTAD_KAFKA_SASL_PASSWORD or IOTAD_KAFKA_SASL_PASSWORD_FILE)"
                )
        if self.keyfile is not None and self.certfile is None:
            raise KafkaSecurityError("kafka_ssl_keyfile is set without kafka_ssl_certfile")
        if self.uses_ssl:
            for name in ("cafile", "certfile", "keyfile"):
                path = getattr(self, name)
                if path is not None and not Path(path).is_file():
                    raise KafkaSecurityError(f"kafka_ssl_{name} {path}: no such file")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: SecuritySettings) -> KafkaSecurity:
        return cls(
            protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            cafile=_path(settings.kafka_ssl_cafile),
            certfile=_path(settings.kafka_ssl_certfile),
            keyfile=_path(settings.kafka_ssl_keyfile),
            check_hostname=settings.kafka_ssl_check_hostname,
        )

    # -- what it means ----------------------------------------------------------------------------
    @property
    def uses_ssl(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def is_plaintext(self) -> bool:
        return self.protocol == "PLAINTEXT"

    def describe(self) -> str:
        """One line for logs: protocol, mechanism, user and CA; never the password."""
        parts = [self.protocol]
        if self.uses_sasl:
            parts.append(f"{self.sasl_mechanism} user={self.username}")
        if self.uses_ssl:
            parts.append(f"ca={self.cafile or 'system'}")
            if self.certfile:
                parts.append(f"client-cert={self.certfile}")
            if not self.check_hostname:
                parts.append("no-hostname-check")
        return " ".join(parts)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for SSL and SASL_SSL (None otherwise): verification on, optional client cert."""
        if not self.uses_ssl:
            return None
        from aiokafka.helpers import create_ssl_context

        context = create_ssl_context(cafile=self.cafile, certfile=self.certfile, keyfile=self.keyfile)
        context.check_hostname = self.check_hostname  # the chain is verified either way (CERT_REQUIRED)
        return context

    def _warn_cleartext(self) -> None:
        if self.protocol == "SASL_PLAINTEXT" and self.sasl_mechanism == "PLAIN":
            log.warning("Kafka SASL/PLAIN over SASL_PLAINTEXT sends the password unencrypted: use SASL_SSL")

    # -- client keyword arguments ------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        if self.is_plaintext:
            return {}
        self._warn_cleartext()
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_ssl:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.username
            kwargs["sasl_plain_password"] = self.password.get_secret_value()
        return kwargs

    def kafka_python(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python clients ({} for PLAINTEXT)."""
        return self._common()

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients ({} for PLAINTEXT)."""
        return self._common()

    def faust_credentials(self) -> CredentialsT | None:
        """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT)."""
        if self.is_plaintext:
            return None
        import faust

        self._warn_cleartext()
        context = self.ssl_context()
        if not self.uses_sasl:
            assert context is not None
            return cast("CredentialsT", faust.SSLCredentials(context))
        return cast(
            "CredentialsT",
            faust.SASLCredentials(
                username=self.username,
                password=self.password.get_secret_value(),
                ssl_context=context,
                mechanism=self.sasl_mechanism,
            ),
        )


PLAINTEXT: Final = KafkaSecurity()

_registry: dict[tuple[str, ...], KafkaSecurity] = {}
_lock = threading.Lock()


def _cluster(bootstrap: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    hosts = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    return tuple(sorted(h.strip().lower() for h in hosts if h.strip()))


def register(bootstrap: str, security: KafkaSecurity) -> None:
    """Use ``security`` for connections to ``bootstrap`` made without an explicit ``security=``."""
    with _lock:
        if security.is_plaintext:
            _registry.pop(_cluster(bootstrap), None)
        else:
            _registry[_cluster(bootstrap)] = security


def clear_registry() -> None:
    with _lock:
        _registry.clear()


def security_for(bootstrap: str | list[str] | tuple[str, ...], security: KafkaSecurity | None = None) -> KafkaSecurity:
    """``security`` when given, else what :func:`register` recorded for ``bootstrap``, else PLAINTEXT."""
    if security is not None:
        return security
    with _lock:
        return _registry.get(_cluster(bootstrap), PLAINTEXT)
