"""Real TLS in front of the embedded Tansu broker, for the Kafka security tests.

Tansu 0.6 has no usable TLS listener (``--cert`` and ``--key`` are mutually exclusive in its CLI and a
listener started with either still speaks plain TCP), so :class:`TlsFront` terminates TLS on loopback and
forwards each connection to Tansu; Tansu advertises the front's address (:class:`AdvertisedTansu`), so
every connection a client makes after bootstrap goes through TLS too. :func:`make_pki` issues a test CA,
a server certificate for 127.0.0.1/localhost, a client certificate (mutual TLS) and an unrelated CA, with
the ``openssl`` command line tool (Debian's ``openssl`` package).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from connectors.localstack import LOOPBACK, Tansu, free_port


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the openssl command is needed for the TLS tests: apt-get install openssl")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-out", str(cert),
        "-days", "2", "-set_serial", str(secrets.randbits(63)), "-extfile", str(ext),
        cwd=d,
    )  # fmt: skip
    return cert, key


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca(d, "iotad-test-ca")
    other = _ca(d, "unrelated-ca")
    server = _leaf(
        d,
        "broker",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    client = _leaf(
        d,
        "iotad-client",
        ca,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    return Pki(ca[0], server[0], server[1], client[0], client[1], other[0])


class AdvertisedTansu(Tansu):
    """Tansu listening on its own port but advertising ``advertised_port`` (the TLS front)."""

    def __init__(self, data_dir: Path, *, advertised_port: int) -> None:
        super().__init__(data_dir)
        self.advertised_port = advertised_port

    def _command(self) -> list[str]:
        cmd = super()._command()
        cmd[cmd.index("--advertised-listener-url") + 1] = f"tcp://{LOOPBACK}:{self.advertised_port}"
        return cmd


class TlsFront:
    """A loopback TLS server forwarding every connection to ``upstream`` (plain TCP); runs in a thread.

    ``client_ca`` given: clients must present a certificate signed by it (mutual TLS).
    ``accepted`` counts connections whose TLS handshake completed.
    """

    def __init__(
        self, upstream_port: int, cert: Path, key: Path, *, client_ca: Path | None = None, port: int | None = None
    ) -> None:
        self.upstream_port = upstream_port
        self.port = port if port is not None else free_port()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(str(client_ca))
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._loop.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> Self:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._on_connection, LOOPBACK, self.port, ssl=self.context)
            )
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="tls-front", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("TLS front did not start")
        return self

    def stop(self) -> None:
        if self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
