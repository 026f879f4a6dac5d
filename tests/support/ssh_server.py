"""An SSH server on loopback for tunnel tests: asyncssh's own server (there is no sshd here).

It runs on its own event loop in a background thread, accepts one user's public key, allows
port forwarding both ways (direct-tcpip and tcpip-forward), and can be restarted on the same
port with the same host key, as a rebooted bastion would come back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from tests.support.servers import free_port

USER = "corral"


class _ForwardingServer(asyncssh.SSHServer):
    def __init__(self, owner: SSHServer) -> None:
        self._owner = owner
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._owner.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._owner.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True  # always authenticate: by the authorized client key

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        return True  # asyncssh opens the connection to dest_host:dest_port itself

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return True


@dataclass
class SSHServer:
    workdir: Path
    port: int = field(default_factory=free_port)
    host_key: asyncssh.SSHKey = field(
        default_factory=lambda: asyncssh.generate_private_key("ssh-ed25519")
    )
    client_key: asyncssh.SSHKey = field(
        default_factory=lambda: asyncssh.generate_private_key("ssh-ed25519")
    )
    connections: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _acceptor: asyncssh.SSHAcceptor | None = None

    @property
    def via(self) -> str:
        return f"{USER}@127.0.0.1:{self.port}"

    @property
    def fingerprint(self) -> str:
        return str(self.host_key.get_fingerprint("sha256"))

    def write_identity(self, name: str = "id_ed25519") -> Path:
        path = self.workdir / name
        path.write_bytes(self.client_key.export_private_key())
        path.chmod(0o600)
        return path

    def write_known_hosts(self, key: asyncssh.SSHKey | None = None) -> Path:
        """A known_hosts file that trusts ``key`` (default: this server's real host key)."""
        public = (key or self.host_key).export_public_key().decode().strip()
        path = self.workdir / f"known_hosts-{id(key)}"
        path.write_text(f"[127.0.0.1]:{self.port} {public}\n")
        return path

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    async def _listen(self) -> None:
        authorized = asyncssh.import_authorized_keys(self.client_key.export_public_key().decode())
        self._acceptor = await asyncssh.create_server(
            lambda: _ForwardingServer(self),
            "127.0.0.1",
            self.port,
            server_host_keys=[self.host_key],
            authorized_client_keys=authorized,
            reuse_address=True,
        )

    def stop_listening(self) -> None:
        """The server goes away: no listener, every connection dropped (the tunnel sees EOF)."""
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)

    async def _close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        for conn in list(self.connections):
            conn.abort()
        self.connections.clear()

    def freeze(self, seconds: float) -> None:
        """The server stops answering for ``seconds`` without closing anything (a pulled
        cable, a hung machine): its event loop is blocked, so not even keepalives get a reply."""
        self._loop.call_soon_threadsafe(time.sleep, seconds)

    def restart(self) -> None:
        self.stop_listening()
        self.start()

    def stop(self) -> None:
        self.stop_listening()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
