#!/usr/bin/env python3
"""Interoperability test: an independent Python gRPC client against istio-csr-rs.

The client stubs are generated at run time from proto/istio/v1/auth/ca.proto with
grpc_tools.protoc, so nothing of the project's own Rust client is used. The server is
started by the caller (see run.sh), which passes its address and data directory:

    interop_test.py --address 127.0.0.1:PORT --data-dir DIR
    interop_test.py --self-check      # no server: stubs generate, requests and CSRs build

The last line printed is "N passed, M failed"; the exit code is 0 only when M is 0.
"""

import argparse
import datetime
import importlib
import importlib.resources
import os
import sys
import tempfile
import unittest

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO_FILE = "istio/v1/auth/ca.proto"

IDENTITY = "spiffe://cluster.local/ns/default/sa/default"
OTHER_IDENTITY = "spiffe://cluster.local/ns/other/sa/other"
CLUSTER_ID = "Kubernetes"
REQUESTED_TTL = 86400
MAX_TTL = datetime.timedelta(hours=1, minutes=2)
RPC_TIMEOUT = 30.0

# Filled in by main() before the tests run.
CONFIG = {}
ca_pb2 = None
ca_pb2_grpc = None


# ---------------------------------------------------------------------------
# Stub generation
# ---------------------------------------------------------------------------

def generate_stubs(proto_root, out_dir):
    """Run protoc on ca.proto into out_dir and import the generated modules."""
    global ca_pb2, ca_pb2_grpc
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        "-I", proto_root,
        "-I", well_known,
        "--python_out", out_dir,
        "--grpc_python_out", out_dir,
        os.path.join(proto_root, PROTO_FILE),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError("grpc_tools.protoc failed with exit code %d on %s" % (rc, PROTO_FILE))
    # The generated modules live in out_dir/istio/v1/auth/ as implicit namespace packages.
    sys.path.insert(0, out_dir)
    importlib.invalidate_caches()
    ca_pb2 = importlib.import_module("istio.v1.auth.ca_pb2")
    ca_pb2_grpc = importlib.import_module("istio.v1.auth.ca_pb2_grpc")


# ---------------------------------------------------------------------------
# CSRs and requests
# ---------------------------------------------------------------------------

def make_key(kind):
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(kind)


def make_csr(key, uris, dns_names=()):
    """A CSR with an empty subject and a critical SAN extension, as pilot-agent sends."""
    names = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def make_request(csr_pem, ttl=REQUESTED_TTL):
    req = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl)
    req.metadata.update({"CertSigner": ""})
    return req


def spki(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def verify_issued_by(test, cert, issuer, what):
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception as e:  # ValueError, TypeError or InvalidSignature
        test.fail("%s is not directly issued by %s: %s: %s"
                  % (what, issuer.subject.rfc4514_string(), type(e).__name__, e))


# ---------------------------------------------------------------------------
# Tests against the running server
# ---------------------------------------------------------------------------

class InteropTest(unittest.TestCase):
    channel = None
    stub = None

    @classmethod
    def setUpClass(cls):
        data_dir = CONFIG["data_dir"]
        with open(os.path.join(data_dir, "root-cert.pem"), "rb") as f:
            cls.root_pem = f.read()
        with open(os.path.join(data_dir, "token"), "r", encoding="utf-8") as f:
            cls.token = f.read().strip()
        if not cls.token:
            raise RuntimeError("token file %s is empty" % os.path.join(data_dir, "token"))
        creds = grpc.ssl_channel_credentials(root_certificates=cls.root_pem)
        cls.channel = grpc.secure_channel(
            CONFIG["address"], creds,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        grpc.channel_ready_future(cls.channel).result(timeout=RPC_TIMEOUT)
        cls.stub = ca_pb2_grpc.IstioCertificateServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        if cls.channel is not None:
            cls.channel.close()

    # -- helpers ------------------------------------------------------------

    def metadata(self, token=None, with_auth=True, cluster=CLUSTER_ID):
        md = []
        if with_auth:
            md.append(("authorization", "Bearer %s" % (self.token if token is None else token)))
        md.append(("clusterid", cluster))
        return md

    def call(self, request, **md_kwargs):
        return self.stub.CreateCertificate(
            request, metadata=self.metadata(**md_kwargs), timeout=RPC_TIMEOUT
        )

    def assert_status(self, expected, request, **md_kwargs):
        try:
            resp = self.call(request, **md_kwargs)
        except grpc.RpcError as e:
            self.assertEqual(
                e.code(), expected,
                "expected %s, got %s: %r" % (expected.name, e.code().name, e.details()),
            )
            return
        self.fail("expected %s, but the call succeeded with a chain of %d element(s)"
                  % (expected.name, len(resp.cert_chain)))

    def check_good_chain(self, key, csr_pem):
        resp = self.call(make_request(csr_pem))
        chain = list(resp.cert_chain)
        self.assertGreaterEqual(len(chain), 2, "cert_chain must hold the leaf and the roots")

        # Element 0: the leaf, exactly one certificate.
        leaf_certs = x509.load_pem_x509_certificates(chain[0].encode("ascii"))
        self.assertEqual(len(leaf_certs), 1, "element 0 must be a single leaf certificate")
        leaf = leaf_certs[0]

        # Exactly one SAN, the caller's SPIFFE URI.
        san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = list(san)
        self.assertEqual(names, [x509.UniformResourceIdentifier(IDENTITY)],
                         "leaf SANs must be exactly the one URI SAN")

        # Same public key as the CSR.
        self.assertEqual(spki(leaf.public_key()), spki(key.public_key()),
                         "leaf public key differs from the CSR's")

        # Lifetime clamped to at most 1h (+2 min slack for backdating).
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        self.assertGreater(lifetime, datetime.timedelta(0), "leaf lifetime must be positive")
        self.assertLessEqual(lifetime, MAX_TTL,
                             "leaf lifetime %s exceeds 1h (+2min)" % lifetime)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertLessEqual(leaf.not_valid_before_utc, now + datetime.timedelta(minutes=2),
                             "leaf is not yet valid")
        self.assertGreater(leaf.not_valid_after_utc, now, "leaf is already expired")

        # Last element: the root bundle, equal to DIR/root-cert.pem.
        roots = x509.load_pem_x509_certificates(chain[-1].encode("ascii"))
        self.assertGreaterEqual(len(roots), 1)
        expected_roots = x509.load_pem_x509_certificates(self.root_pem)
        self.assertEqual([der(c) for c in roots], [der(c) for c in expected_roots],
                         "last chain element differs from root-cert.pem")

        # Middle elements: one intermediate each.
        intermediates = []
        for i, pem in enumerate(chain[1:-1], start=1):
            certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
            self.assertEqual(len(certs), 1, "chain element %d must be one intermediate" % i)
            intermediates.append(certs[0])

        # Signature chain: leaf <- intermediates... <- a root of the bundle.
        path = [leaf] + intermediates
        for i in range(len(path) - 1):
            verify_issued_by(self, path[i], path[i + 1], "chain element %d" % i)
        last = path[-1]
        candidates = [r for r in roots if r.subject == last.issuer]
        self.assertTrue(candidates, "no root in the bundle has subject %s (issuer of element %d)"
                        % (last.issuer.rfc4514_string(), len(path) - 1))
        verify_issued_by(self, last, candidates[0], "chain element %d" % (len(path) - 1))
        return leaf

    # -- cases --------------------------------------------------------------

    def test_a_happy_path_ecdsa_p256(self):
        key = make_key("ec")
        self.check_good_chain(key, make_csr(key, [IDENTITY]))

    def test_b_rsa_2048(self):
        key = make_key("rsa")
        self.check_good_chain(key, make_csr(key, [IDENTITY]))

    def test_c_extra_dns_san_is_invalid_argument(self):
        key = make_key("ec")
        csr = make_csr(key, [IDENTITY], dns_names=["foo.example.com"])
        self.assert_status(grpc.StatusCode.INVALID_ARGUMENT, make_request(csr))

    def test_d_no_authorization_is_unauthenticated(self):
        key = make_key("ec")
        self.assert_status(grpc.StatusCode.UNAUTHENTICATED,
                           make_request(make_csr(key, [IDENTITY])), with_auth=False)

    def test_e_wrong_token_is_unauthenticated(self):
        key = make_key("ec")
        self.assert_status(grpc.StatusCode.UNAUTHENTICATED,
                           make_request(make_csr(key, [IDENTITY])),
                           token="not-the-right-token-" + "x" * 16)

    def test_f_other_identity_is_permission_denied(self):
        key = make_key("ec")
        self.assert_status(grpc.StatusCode.PERMISSION_DENIED,
                           make_request(make_csr(key, [OTHER_IDENTITY])))

    def test_g_garbage_csr_is_invalid_argument(self):
        self.assert_status(grpc.StatusCode.INVALID_ARGUMENT, make_request("not a csr"))

    def test_h_unknown_cluster_is_unauthenticated(self):
        key = make_key("ec")
        self.assert_status(grpc.StatusCode.UNAUTHENTICATED,
                           make_request(make_csr(key, [IDENTITY])),
                           cluster="some-other-cluster")


# ---------------------------------------------------------------------------
# Self-check: no server needed
# ---------------------------------------------------------------------------

class SelfCheckTest(unittest.TestCase):
    def test_stub_descriptors_match_wire_contract(self):
        svc = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
        self.assertEqual(svc.full_name, "istio.v1.auth.IstioCertificateService")
        method = svc.methods_by_name["CreateCertificate"]
        self.assertEqual(method.input_type.full_name, "istio.v1.auth.IstioCertificateRequest")
        self.assertEqual(method.output_type.full_name, "istio.v1.auth.IstioCertificateResponse")
        req = ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields_by_name
        self.assertEqual(req["csr"].number, 1)
        self.assertEqual(req["validity_duration"].number, 3)
        self.assertEqual(req["metadata"].number, 4)
        self.assertEqual(req["metadata"].message_type.full_name, "google.protobuf.Struct")
        resp = ca_pb2.IstioCertificateResponse.DESCRIPTOR.fields_by_name
        self.assertEqual(resp["cert_chain"].number, 1)
        self.assertTrue(hasattr(ca_pb2_grpc, "IstioCertificateServiceStub"))

    def check_csr(self, kind, uris, dns=()):
        key = make_key(kind)
        pem = make_csr(key, uris, dns)
        req = make_request(pem)
        back = ca_pb2.IstioCertificateRequest.FromString(req.SerializeToString())
        self.assertEqual(back.csr, pem)
        self.assertEqual(back.validity_duration, REQUESTED_TTL)
        self.assertIn("CertSigner", back.metadata.fields)
        self.assertEqual(back.metadata["CertSigner"], "")
        csr = x509.load_pem_x509_csr(back.csr.encode("ascii"))
        self.assertTrue(csr.is_signature_valid)
        self.assertEqual(len(csr.subject), 0, "subject must be empty")
        ext = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        self.assertTrue(ext.critical)
        self.assertEqual(ext.value.get_values_for_type(x509.UniformResourceIdentifier), list(uris))
        self.assertEqual(ext.value.get_values_for_type(x509.DNSName), list(dns))
        self.assertEqual(spki(csr.public_key()), spki(key.public_key()))

    def test_ecdsa_csr_builds(self):
        self.check_csr("ec", [IDENTITY])

    def test_rsa_csr_builds(self):
        self.check_csr("rsa", [IDENTITY])

    def test_dns_san_csr_builds(self):
        self.check_csr("ec", [IDENTITY], ["foo.example.com"])

    def test_other_identity_csr_builds(self):
        self.check_csr("ec", [OTHER_IDENTITY])

    def test_garbage_request_builds(self):
        req = make_request("not a csr")
        self.assertEqual(ca_pb2.IstioCertificateRequest.FromString(req.SerializeToString()).csr,
                         "not a csr")


# ---------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="server address, e.g. 127.0.0.1:15012")
    p.add_argument("--data-dir", help="the server's --data-dir (root-cert.pem, token)")
    p.add_argument("--proto-root", default=DEFAULT_PROTO_ROOT,
                   help="include root holding %s (default: %%(default)s)" % PROTO_FILE)
    p.add_argument("--self-check", action="store_true",
                   help="only check that stubs generate and requests/CSRs build; no server")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.self_check and (not args.address or not args.data_dir):
        p.error("--address and --data-dir are required unless --self-check is given")
    CONFIG.update(address=args.address, data_dir=args.data_dir)

    with tempfile.TemporaryDirectory(prefix="istio-csr-interop-stubs-") as out_dir:
        try:
            generate_stubs(args.proto_root, out_dir)
        except Exception as e:
            print("stub generation failed: %s: %s" % (type(e).__name__, e), file=sys.stderr)
            print("0 passed, 1 failed")
            return 1

        case = SelfCheckTest if args.self_check else InteropTest
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(case)
        total = suite.countTestCases()
        result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)

    sys.stderr.flush()
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    # An error in setUpClass is reported once but means none of the cases ran.
    not_run = total - result.testsRun
    failed += not_run
    if any(t.__class__.__name__ == "_ErrorHolder" for t, _ in result.errors):
        failed = max(failed, total)
    skipped = len(result.skipped)
    passed = max(0, total - failed - skipped)
    failed = total - passed - skipped
    line = "%d passed, %d failed" % (passed, failed)
    if skipped:
        line += ", %d skipped" % skipped
    print(line)
    sys.stdout.flush()
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
