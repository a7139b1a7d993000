"""Time of one certificate issuance against a local Pebble, next to its peers.

Pebble runs once with real HTTP-01 validation and once with
PEBBLE_VA_ALWAYS_VALID=1, both without Retry-After and with
PEBBLE_VA_NOSLEEP=1. Each row measures ``--runs`` issuances, each for a
new name, after one warm-up issuance that registers the account:

- ``singlewriter renew()``: the full renewal in this process, lock and
  KeyStore commit (fsync) included.
- ``acme ClientV2, 25 ms polls``: the same protocol steps with raw calls
  of the acme package, polling every 25 ms, no lock and no store.
- ``acme ClientV2 poll_and_finalize``: raw calls with acme's own polling,
  which sleeps one second between authorization polls and before each
  order poll.
- ``singlewriter renew(), new process``: ``renew()`` in a fresh Python
  process, interpreter start and imports included.
- ``certbot certonly``: certbot's standalone authenticator, one process per
  certificate, when a certbot executable is found (``--certbot PATH``, the
  CERTBOT environment variable, or PATH). Install it in its own virtual
  environment to keep its dependencies out of the project's.

Every server, port and directory is on 127.0.0.1 or under a temporary
directory. Needs the Pebble binaries of tests/servers/build.sh.

Run: python -m benchmarks.bench_issuance [--runs N] [--certbot PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from acme import challenges, client, crypto_util, messages, standalone
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import jwa, jwk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from singlewriter.acme import HTTP01Standalone, renew  # noqa: E402
from tests.servers.pebble import start_pebble  # noqa: E402

Issue = Callable[[str], None]


def new_name() -> str:
    return f"bench-{uuid.uuid4().hex[:12]}.example.com"


def measure(issue: Issue, runs: int) -> list[float]:
    """Return the seconds of ``runs`` issuances after one warm-up issuance."""
    issue(new_name())
    times = []
    for _ in range(runs):
        name = new_name()
        started = time.perf_counter()
        issue(name)
        times.append(time.perf_counter() - started)
    return times


# singlewriter.


def singlewriter_in_process(pebble: object, workdir: Path) -> Issue:
    locks = workdir / "locks"
    locks.mkdir(parents=True)

    def issue(name: str) -> None:
        result = renew(
            [name],
            lock=f"file://{locks}",
            store=str(workdir / "stores" / name),
            directory_url=pebble.directory_url,  # type: ignore[attr-defined]
            account=str(workdir / "account"),
            challenge=HTTP01Standalone(
                port=pebble.http01_port,  # type: ignore[attr-defined]
                address="127.0.0.1",
            ),
            ca_bundle=pebble.ca_bundle_path,  # type: ignore[attr-defined]
        )
        assert result.renewed

    return issue


_CHILD = """
import sys
from singlewriter.acme import HTTP01Standalone, renew
name, locks, stores, directory, account, port, ca = sys.argv[1:]
result = renew([name], lock="file://" + locks, store=stores + "/" + name,
               directory_url=directory, account=account, ca_bundle=ca,
               challenge=HTTP01Standalone(port=int(port), address="127.0.0.1"))
assert result.renewed
"""


def singlewriter_new_process(pebble: object, workdir: Path) -> Issue:
    locks = workdir / "locks"
    locks.mkdir(parents=True)
    environment = dict(os.environ, PYTHONPATH=str(ROOT))

    def issue(name: str) -> None:
        subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                name,
                str(locks),
                str(workdir / "stores"),
                pebble.directory_url,  # type: ignore[attr-defined]
                str(workdir / "account"),
                str(pebble.http01_port),  # type: ignore[attr-defined]
                pebble.ca_bundle_path,  # type: ignore[attr-defined]
            ],
            check=True,
            env=environment,
        )

    return issue


# Raw acme calls.


class RawClient:
    """The protocol steps with the acme package only: no lock, no store."""

    def __init__(self, pebble: object, *, short_polls: bool) -> None:
        self.pebble = pebble
        self.short_polls = short_polls
        key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        net = client.ClientNetwork(key, alg=jwa.ES256, user_agent="bench")
        net.verify_ssl = pebble.ca_bundle_path  # type: ignore[attr-defined,assignment]
        directory = client.ClientV2.get_directory(
            pebble.directory_url,  # type: ignore[attr-defined]
            net,
        )
        self.client = client.ClientV2(directory, net)
        self.client.new_account(
            messages.NewRegistration.from_data(terms_of_service_agreed=True)
        )

    def issue(self, name: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        order = self.client.new_order(crypto_util.make_csr(key_pem, [name]))
        resources = set()
        for authorization in order.authorizations:
            for body in authorization.body.challenges:
                if isinstance(body.chall, challenges.HTTP01):
                    response, validation = body.response_and_validation(
                        self.client.net.key
                    )
                    resources.add(
                        standalone.HTTP01RequestHandler.HTTP01Resource(
                            chall=body.chall, response=response, validation=validation
                        )
                    )
                    answer = (body, response)
        server = standalone.HTTP01Server(
            ("127.0.0.1", self.pebble.http01_port),  # type: ignore[attr-defined]
            resources,
        )
        try:
            import threading

            # serve_forever notices shutdown() only at its next poll.
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
            )
            thread.start()
            self.client.answer_challenge(*answer)
            deadline = datetime.now() + timedelta(seconds=60)
            if self.short_polls:
                self._short_polls(order)
            else:
                self.client.poll_and_finalize(order, deadline)
        finally:
            server.shutdown()
            server.server_close()

    def _short_polls(self, order: messages.OrderResource) -> None:
        net = self.client
        for url in order.body.authorizations:
            while True:
                body = messages.Authorization.from_json(net._post_as_get(url).json())
                if body.status != messages.STATUS_PENDING:
                    break
                time.sleep(0.025)
        order = net.begin_finalization(order)
        while True:
            body = messages.Order.from_json(net._post_as_get(order.uri).json())
            if body.status == messages.STATUS_VALID:
                net._post_as_get(body.certificate)
                return
            if body.status == messages.STATUS_INVALID:
                raise RuntimeError(f"order {order.uri} became invalid: {body.error}")
            time.sleep(0.025)


def raw_acme(pebble: object, workdir: Path, *, short_polls: bool) -> Issue:
    raw = RawClient(pebble, short_polls=short_polls)
    return raw.issue


# certbot.


def certbot(pebble: object, workdir: Path, executable: str) -> Issue:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy")
    }
    environment["REQUESTS_CA_BUNDLE"] = pebble.ca_bundle_path  # type: ignore[attr-defined]

    def issue(name: str) -> None:
        subprocess.run(
            [
                executable,
                "certonly",
                "--standalone",
                "--http-01-address",
                "127.0.0.1",
                "--http-01-port",
                str(pebble.http01_port),  # type: ignore[attr-defined]
                "--server",
                pebble.directory_url,  # type: ignore[attr-defined]
                "--config-dir",
                str(workdir / "config"),
                "--work-dir",
                str(workdir / "work"),
                "--logs-dir",
                str(workdir / "logs"),
                "--non-interactive",
                "--agree-tos",
                "-m",
                "bench@example.com",
                "--key-type",
                "ecdsa",
                "-d",
                name,
            ],
            check=True,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return issue


def find_certbot(option: str | None) -> str | None:
    candidate = option or os.environ.get("CERTBOT") or shutil.which("certbot")
    if candidate and os.access(candidate, os.X_OK):
        return candidate
    return None


# The table.


def describe(times: list[float]) -> str:
    ordered = sorted(times)
    median = statistics.median(ordered)
    return (
        f"{median * 1000:9.0f} {ordered[0] * 1000:9.0f} {ordered[-1] * 1000:9.0f}"
        f" {len(ordered):5d}"
    )


def run_mode(always_valid: bool, runs: int, certbot_path: str | None) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="singlewriter-bench-acme-"))
    pebble = start_pebble(
        workdir / "pebble",
        always_valid=always_valid,
        retry_after_authz=0,
        retry_after_order=0,
    )
    rows: list[tuple[str, Callable[[], Issue]]] = [
        (
            "singlewriter renew()",
            lambda: singlewriter_in_process(pebble, workdir / "sw"),
        ),
        (
            "acme ClientV2, 25 ms polls",
            lambda: raw_acme(pebble, workdir / "raw", short_polls=True),
        ),
        (
            "acme ClientV2 poll_and_finalize",
            lambda: raw_acme(pebble, workdir / "stock", short_polls=False),
        ),
        (
            "singlewriter renew(), new process",
            lambda: singlewriter_new_process(pebble, workdir / "sw-process"),
        ),
    ]
    if certbot_path is not None:
        path = certbot_path
        rows.append(("certbot certonly", lambda: certbot(pebble, workdir / "cb", path)))

    mode = "PEBBLE_VA_ALWAYS_VALID=1" if always_valid else "real HTTP-01 validation"
    print(f"\nPebble with {mode}:")
    print(f"{'':36} {'median ms':>9} {'min ms':>9} {'max ms':>9} {'runs':>5}")
    try:
        for label, make in rows:
            times = measure(make(), runs)
            print(f"{label:36} {describe(times)}", flush=True)
    finally:
        pebble.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="issuances per row")
    parser.add_argument("--certbot", help="path of a certbot executable")
    arguments = parser.parse_args(argv)
    certbot_path = find_certbot(arguments.certbot)
    if certbot_path is None:
        print("certbot not found: its row is left out (see --certbot)")
    for always_valid in (False, True):
        run_mode(always_valid, arguments.runs, certbot_path)


if __name__ == "__main__":
    main(sys.argv[1:])
