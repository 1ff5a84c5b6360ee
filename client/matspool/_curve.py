"""CURVE keys for TCP endpoints: encryption and client authentication from ZeroMQ itself.

An ipc socket is protected by file permissions; a TCP port is open to the network, so
both sides refuse TCP without keys. Keys are ZeroMQ certificate files made by
``matspool keygen`` (``NAME.key`` public, ``NAME.key_secret`` secret).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
import zmq.auth

__all__ = ["ClientKeys", "is_tcp", "load_secret", "make_keys"]


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def make_keys(directory: str, name: str) -> tuple[str, str]:
    """Write a new key pair; returns (public file, secret file). The secret is owner-only."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def load_secret(path: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a client needs for a TCP endpoint: its own secret, the server's public key."""

    client_secret_file: str
    server_public_file: str

    @classmethod
    def from_env(cls) -> ClientKeys | None:
        secret = os.environ.get("MATSPOOL_CURVE_CLIENT_SECRET")
        server = os.environ.get("MATSPOOL_CURVE_SERVER_PUBLIC")
        return cls(secret, server) if secret and server else None

    def public_keys(self) -> tuple[str, str]:
        """(this client's public key, the server key it expects), Z85 text, for messages;
        '?' where a file cannot be read."""
        try:
            mine = zmq.auth.load_certificate(self.client_secret_file)[0].decode()
        except (OSError, ValueError):
            mine = "?"
        try:
            server = zmq.auth.load_certificate(self.server_public_file)[0].decode()
        except (OSError, ValueError):
            server = "?"
        return mine, server

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        public, secret = load_secret(self.client_secret_file)
        server_public, _ = zmq.auth.load_certificate(self.server_public_file)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_public
