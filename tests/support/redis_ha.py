"""Real Redis topologies beyond one server: a primary with a replica watched by three
sentinels, and a redis-server that speaks only TLS (with a CA made for the test)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.localcluster import free_port, redis_server_command, stop_process
from tests.support.servers import wait_until

MASTER_NAME = "corralmaster"
PASSWORD = "ha-s3cret-pw"
"""The primary's and replica's password (the sentinels take none, as in most home labs)."""
# Sentinel's timing, shortened for a test: a primary silent for 1 s is down; the sentinels'
# own timeouts stay at their defaults otherwise.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 10000


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH: run `make test`, which installs it")
    return binary


def _ping(port: int, password: str | None = None) -> bool:
    client = redis.Redis(
        port=port, password=password, socket_connect_timeout=0.5, socket_timeout=0.5
    )
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


@dataclass
class RedisHA:
    """A primary, one replica and three sentinels on loopback; all stopped by ``stop``."""

    workdir: Path
    servers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    sentinels: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The broker URL: the primary's password in the first entry, as kombu reads it."""
        entries = [f"sentinel://127.0.0.1:{port}" for port in self.sentinels]
        entries[0] = entries[0].replace("//", f"//:{PASSWORD}@")
        return ";".join(entries[:1]) + "/0;" + ";".join(entries[1:])

    def primary_port(self) -> int:
        """Where the sentinels say the primary is now."""
        port = next(iter(self.sentinels))
        client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
        try:
            _host, primary = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
            )
        finally:
            client.close()
        return int(primary)

    def kill(self, port: int) -> None:
        """SIGKILL a data server: its host lost power, nothing flushed, nothing said."""
        stop_process(self.servers[port], signal.SIGKILL)

    def stop(self) -> None:
        for process in [*self.sentinels.values(), *self.servers.values()]:
            stop_process(process, timeout_s=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _start_data_server(ha: RedisHA, replica_of: int | None) -> int:
    port = free_port()
    workdir = ha.workdir / f"redis-{port}"
    workdir.mkdir()
    # masterauth on both: the replica promoted later is then the one the other follows.
    args = [
        *redis_server_command(_binary(), port, workdir),
        *("--requirepass", PASSWORD, "--masterauth", PASSWORD),
    ]
    if replica_of is not None:
        args += ["--replicaof", "127.0.0.1", str(replica_of)]
    ha.servers[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: _ping(port, PASSWORD), 10, f"redis-server on {port}")
    return port


def _start_sentinel(ha: RedisHA, primary: int) -> int:
    port = free_port()
    # Sentinel rewrites its config file as it learns the topology, so each has its own.
    config = ha.workdir / f"sentinel-{port}.conf"
    config.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {ha.workdir}\n"
        f"logfile {ha.workdir / f'sentinel-{port}.log'}\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n"
        f"sentinel auth-pass {MASTER_NAME} {PASSWORD}\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
        f"sentinel parallel-syncs {MASTER_NAME} 1\n"
    )
    ha.sentinels[port] = subprocess.Popen(
        [_binary(), str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: _ping(port), 10, f"sentinel on {port}")
    return port


def _replica_in_sync(port: int) -> bool:
    client = redis.Redis(port=port, password=PASSWORD, socket_timeout=1, decode_responses=True)
    try:
        return client.info("replication").get("master_link_status") == "up"
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def _sentinels_know_everyone(ha: RedisHA) -> bool:
    """Each sentinel has found the replica and the two other sentinels (a failover needs a
    quorum and somewhere to go)."""
    for port in ha.sentinels:
        client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
        try:
            state = client.sentinel_master(MASTER_NAME)  # redis-py parses it into a dict
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()
        if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
            return False
    return True


@contextlib.contextmanager
def running_redis_ha() -> Iterator[RedisHA]:
    ha = RedisHA(Path(tempfile.mkdtemp(prefix="corral-ha-")))
    try:
        primary = _start_data_server(ha, None)
        replica = _start_data_server(ha, primary)
        wait_until(lambda: _replica_in_sync(replica), 15, "the replica to sync")
        for _ in range(3):
            _start_sentinel(ha, primary)
        wait_until(lambda: _sentinels_know_everyone(ha), 20, "the sentinels to meet")
        yield ha
    finally:
        ha.stop()


# --- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca_file: Path

    @property
    def url(self) -> str:
        # "localhost": the name the server's certificate was made for, so it is checked.
        return f"rediss://localhost:{self.port}/0"


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate it signed for localhost and 127.0.0.1:
    (CA file, server certificate, server key), all PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corral test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "server.pem", "server.key"))
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


@contextlib.contextmanager
def running_tls_redis() -> Iterator[TlsRedis]:
    """redis-server answering only on a TLS port (its plain port off), with a fresh CA."""
    workdir = Path(tempfile.mkdtemp(prefix="corral-tls-"))
    ca_file, cert_file, key_file = make_ca_and_server_cert(workdir)
    port = free_port()
    args = [
        *redis_server_command(_binary(), 0, workdir),
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert_file),
        "--tls-key-file",
        str(key_file),
        "--tls-ca-cert-file",
        str(ca_file),
        # Clients show no certificate of their own: the server's is what is checked.
        "--tls-auth-clients",
        "no",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = TlsRedis(port, ca_file)
    try:

        def answers() -> bool:
            client = redis.Redis.from_url(
                server.url, ssl_ca_certs=str(ca_file), socket_connect_timeout=0.5
            )
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False
            finally:
                client.close()

        wait_until(answers, 10, "the TLS redis-server to answer")
        yield server
    finally:
        stop_process(process, timeout_s=10)
        shutil.rmtree(workdir, ignore_errors=True)
