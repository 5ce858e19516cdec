"""Handshake cost: Noise XX with identity binding, against a TLS 1.3 handshake, both in memory.

Cases (all single-threaded, both sides in this process, no sockets):

* noise: `InitiatorHandshake` / `ResponderHandshake` exchange the three XX messages; each side
  verifies the other's Ed25519 static binding and derives the transport keys.
* endpoint: two sans-IO `Endpoint`s exchange datagrams in memory: INIT, RESP, FINISH plus the
  keepalives that confirm the session on both sides (5 datagrams, headers parsed and built).
* baseline: TLS 1.3 between two `ssl.SSLObject`s over `MemoryBIO`s, mutual authentication with
  self-signed Ed25519 certificates (both sides prove a key, as in XX), no session tickets. A
  server-only-auth TLS handshake is also timed, for information.

Cases are interleaved in rounds so that noise on a shared machine hits them alike. Long-lived
state (identities, SSL contexts with their certificates) is built once, outside the timing, as a
node would; per-handshake state (HandshakeState, Endpoint session tables, SSLObject) is inside.
"""

from __future__ import annotations

import datetime
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from _common import (
    Metric,
    Result,
    Summary,
    Target,
    exit_on_sigterm,
    now_ns,
    parse_args,
    print_header,
    report,
    summarize,
)
from cellmesh.config import NodeConfig
from cellmesh.identity.keys import Identity
from cellmesh.transport.endpoint import Endpoint
from cellmesh.transport.handshake import InitiatorHandshake, ResponderHandshake
from cellmesh.wire.header import Datagram
from cellmesh.wire.messages import HandshakePattern

BENCH = "bench_handshake"
TARGET_S = 1.5e-3
Addr = tuple[str, int]
A_ADDR: Addr = ("127.0.0.1", 40001)
B_ADDR: Addr = ("127.0.0.1", 40002)


# ------------------------------------------------------------------------------ ours


def noise_xx(a: Identity, b: Identity) -> Callable[[], None]:
    """One full XX handshake through the transport handshake classes."""

    def run() -> None:
        ini = InitiatorHandshake(a, 1)
        m1 = ini.first_message()
        resp = ResponderHandshake(b, 2, HandshakePattern.XX)
        r = resp.read_init(m1)
        peer_b, _, m3, keys_a = ini.read_response(r.response)
        assert m3 is not None
        peer_a, keys_b = resp.read_finish(m3)
        if peer_b.cell_id != b.cell_id or peer_a.cell_id != a.cell_id:
            raise AssertionError("handshake authenticated the wrong peer")
        if keys_a.handshake_hash != keys_b.handshake_hash:
            raise AssertionError("handshake hashes differ")

    return run


def endpoint_pair(a: Identity, b: Identity, config: NodeConfig) -> tuple[Endpoint, Endpoint]:
    """Two fresh endpoints (built outside the timing: a node builds its endpoint once)."""
    now = time.monotonic()
    return Endpoint(a, config, now), Endpoint(b, config, now)


def endpoint_handshake(ea: Endpoint, eb: Endpoint) -> int:
    """Connect `ea` to `eb` and shuttle datagrams until both are quiet; return the datagram count."""
    now = time.monotonic()
    ea.connect(B_ADDR, now)
    count = 0
    out_a = ea.datagrams_to_send()
    out_b: list[tuple[Datagram, Addr]] = []
    while out_a or out_b:
        for data, _ in out_a:
            eb.receive_datagram(data, A_ADDR, now)
        for data, _ in out_b:
            ea.receive_datagram(data, B_ADDR, now)
        count += len(out_a) + len(out_b)
        out_a = ea.datagrams_to_send()
        out_b = eb.datagrams_to_send()
    return count


def check_endpoints(ea: Endpoint, eb: Endpoint, count: int) -> None:
    """The in-memory handshake really completed and confirmed on both sides."""
    sa = ea.session_for(eb.cell_id)
    sb = eb.session_for(ea.cell_id)
    if sa is None or sb is None or not sa.confirmed or not sb.confirmed:
        raise AssertionError("endpoint handshake did not leave confirmed sessions on both sides")
    da, db = ea.statistics().drops, eb.statistics().drops
    if da or db:
        raise AssertionError(f"unexpected drops: {da} {db}")
    if count != 5:
        raise AssertionError(f"expected 5 datagrams (INIT RESP FINISH KA KA), saw {count}")


# ------------------------------------------------------------------------------ baseline


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_contexts(mutual: bool) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(client, server) TLS 1.3-only contexts with fresh self-signed Ed25519 certificates."""
    with tempfile.TemporaryDirectory(prefix="cellmesh-bench-") as tmp:
        d = Path(tmp)
        s_cert, s_key = _self_signed(d, "server.bench")
        c_cert, c_key = _self_signed(d, "client.bench")
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_3
        server.load_cert_chain(s_cert, s_key)
        server.num_tickets = 0
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the hostname
        client.minimum_version = ssl.TLSVersion.TLSv1_3
        client.load_verify_locations(s_cert)
        if mutual:
            server.verify_mode = ssl.CERT_REQUIRED
            server.load_verify_locations(c_cert)
            client.load_cert_chain(c_cert, c_key)
    return client, server


def tls_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> Callable[[], None]:
    """One full TLS 1.3 handshake between two SSLObjects over memory BIOs."""

    def run() -> None:
        c_in, c_out, s_in, s_out = (
            ssl.MemoryBIO(),
            ssl.MemoryBIO(),
            ssl.MemoryBIO(),
            ssl.MemoryBIO(),
        )
        client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="server.bench")
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        c_done = s_done = False
        for _ in range(8):
            if not c_done:
                try:
                    client.do_handshake()
                    c_done = True
                except ssl.SSLWantReadError:
                    pass
            if c_out.pending:
                s_in.write(c_out.read())
            if not s_done:
                try:
                    server.do_handshake()
                    s_done = True
                except ssl.SSLWantReadError:
                    pass
            if s_out.pending:
                c_in.write(s_out.read())
            if c_done and s_done and not c_out.pending:
                if client.version() != "TLSv1.3":
                    raise AssertionError(f"negotiated {client.version()}")
                return
        raise AssertionError("TLS handshake did not complete")

    return run


# ------------------------------------------------------------------------------ driver


def measure(rounds: int, per_round: int, warmup: int) -> dict[str, list[float]]:
    """Interleave the cases in rounds; return each case's per-handshake durations (seconds)."""
    a, b = Identity.generate(), Identity.generate()
    a.static_binding(), b.static_binding()  # signed once per identity, as a node does
    config = NodeConfig(listen=("127.0.0.1:0",))
    mutual_client, mutual_server = tls_contexts(mutual=True)
    server_client, server_server = tls_contexts(mutual=False)
    simple: dict[str, Callable[[], None]] = {
        "noise": noise_xx(a, b),
        "tls_mutual": tls_handshake(mutual_client, mutual_server),
        "tls_server": tls_handshake(server_client, server_server),
    }
    samples: dict[str, list[float]] = {k: [] for k in [*simple, "endpoint"]}
    for fn in simple.values():
        for _ in range(warmup):
            fn()
    for _ in range(warmup):
        ea, eb = endpoint_pair(a, b, config)
        check_endpoints(ea, eb, endpoint_handshake(ea, eb))
    for _ in range(rounds):
        for name, fn in simple.items():
            out = samples[name]
            for _ in range(per_round):
                t0 = now_ns()
                fn()
                out.append((now_ns() - t0) * 1e-9)
        out = samples["endpoint"]
        for _ in range(per_round):
            ea, eb = endpoint_pair(a, b, config)
            t0 = now_ns()
            count = endpoint_handshake(ea, eb)
            out.append((now_ns() - t0) * 1e-9)
            check_endpoints(ea, eb, count)
    return samples


def metrics(ours: Summary, base: Summary) -> list[Metric]:
    return [
        Metric("median", ours.median, base.median, "ms", "lower"),
        Metric("p99", ours.p99, base.p99, "ms", "lower"),
        Metric("mean", ours.mean, base.mean, "ms", "lower"),
        Metric("handshakes/s", ours.per_second, base.per_second, "/s", "higher"),
    ]


def main() -> int:
    exit_on_sigterm()
    args = parse_args(__doc__.splitlines()[0] if __doc__ else BENCH)
    rounds, per_round, warmup = (4, 50, 20) if args.quick else (10, 200, 100)
    print_header(BENCH, f"{rounds} rounds x {per_round} handshakes per case")
    t0 = time.monotonic()
    samples = measure(rounds, per_round, warmup)
    s = {k: summarize(v) for k, v in samples.items()}
    base_label = "TLS 1.3 mutual auth, Ed25519 certs, ssl.SSLObject + MemoryBIO, no tickets"
    server_only = s["tls_server"]
    for case, label in (
        ("noise", "Noise XX + Ed25519 binding verify, InitiatorHandshake/ResponderHandshake"),
        ("endpoint", "two sans-IO Endpoints in memory: INIT/RESP/FINISH + confirming keepalives"),
    ):
        ours = s[case]
        report(
            Result(
                bench=BENCH,
                case=case,
                ours=label,
                baseline=base_label,
                metrics=metrics(ours, s["tls_mutual"]),
                targets=[Target("median under 1.5 ms", ours.median < TARGET_S)],
                notes=[
                    f"TLS 1.3 server-auth only (client sends no cert): median "
                    f"{server_only.median * 1e3:.3f} ms, p99 {server_only.p99 * 1e3:.3f} ms; "
                    f"ours/that = {ours.median / server_only.median:.2f}x"
                ],
                extra={"n": ours.n, "tls_server_median_s": server_only.median},
            ),
            args.json,
            args.quick,
        )
    print(f"\n({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
