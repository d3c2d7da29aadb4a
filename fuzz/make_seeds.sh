#!/usr/bin/env bash
# Writes the seed inputs of every fuzz target into fuzz/seeds/<target>/ (not kept in git: the
# kept corpus is fuzz/corpus/, minimised from these seeds plus what the fuzzer found; see
# docs/fuzzing.md). Needs openssl and python3. The fixed keys and root are in fuzz/fixtures/.
set -euo pipefail
cd "$(dirname "$0")"
out=seeds
rm -rf "$out"
mkdir -p "$out"/{csr,spiffe,metadata,chain,kubeconfig,selector}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fx=fixtures
ID=spiffe://cluster.local/ns/default/sa/default

# put <target> <name> <mode byte as decimal or "-" for none> <file>
put() {
    local target=$1 name=$2 mode=$3 file=$4
    if [ "$mode" = "-" ]; then
        cp "$file" "$out/$target/$name"
    else
        { printf "\\x$(printf %02x "$mode")"; cat "$file"; } >"$out/$target/$name"
    fi
}
# first <der file>: the first element inside the outer SEQUENCE (a CSR's info, a cert's TBS)
first() {
    python3 - "$1" <<'EOF'
import sys
d = open(sys.argv[1], "rb").read()
def hdr(b, i):
    n = b[i + 1]
    if n < 0x80:
        return 2, n
    k = n & 0x7F
    return 2 + k, int.from_bytes(b[i + 2:i + 2 + k], "big")
h, _ = hdr(d, 0)
h2, n2 = hdr(d, h)
sys.stdout.buffer.write(d[h:h + h2 + n2])
EOF
}

# ---- csr: CSRs as pilot-agent (Go) and openssl make them, good and bad ----
csr() { # csr <name> <key file> <req args...>
    local name=$1 key=$2
    shift 2
    openssl req -new -key "$key" "$@" -out "$tmp/$name.pem" 2>/dev/null
    openssl req -in "$tmp/$name.pem" -outform DER -out "$tmp/$name.der"
    put csr "$name-pem" 0 "$tmp/$name.pem"
    put csr "$name-der" 1 "$tmp/$name.der"
    # mode 2 re-signs the info with the fixed key: only CSRs made with that key make sense
    if [ "$key" = "$fx/csr-key.pem" ]; then
        first "$tmp/$name.der" >"$tmp/$name.info"
        put csr "$name-info" 2 "$tmp/$name.info"
    fi
}
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$tmp/key-p384.pem" 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/key-rsa.pem" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out "$tmp/key-p521.pem" 2>/dev/null
openssl genpkey -algorithm ED25519 -out "$tmp/key-ed.pem" 2>/dev/null
k=$fx/csr-key.pem
csr istio "$k" -subj "/O=" -addext "subjectAltName=critical,URI:$ID"
csr two-uris "$k" -subj "/O=istio" -addext "subjectAltName=URI:$ID,URI:spiffe://td/ns/a/sa/b"
csr usages "$k" -subj "/O=" -addext "subjectAltName=URI:$ID" \
    -addext "keyUsage=critical,digitalSignature,keyEncipherment" \
    -addext "extendedKeyUsage=serverAuth,clientAuth"
csr dns "$k" -subj "/O=" -addext "subjectAltName=URI:$ID,DNS:evil.example.com"
csr cn "$k" -subj "/CN=x" -addext "subjectAltName=URI:$ID"
csr dup "$k" -subj "/O=" -addext "subjectAltName=URI:$ID,URI:$ID"
csr ca "$k" -subj "/O=" -addext "subjectAltName=URI:$ID" -addext "basicConstraints=CA:true"
csr nosan "$k" -subj "/O="
csr sha384 "$k" -sha384 -subj "/O=" -addext "subjectAltName=URI:$ID"
csr p384 "$tmp/key-p384.pem" -subj "/O=" -addext "subjectAltName=URI:$ID"
csr rsa "$tmp/key-rsa.pem" -subj "/O=" -addext "subjectAltName=URI:$ID"
csr rsa-pss "$tmp/key-rsa.pem" -sigopt rsa_padding_mode:pss -subj "/O=" -addext "subjectAltName=URI:$ID"
csr p521 "$tmp/key-p521.pem" -subj "/O=" -addext "subjectAltName=URI:$ID"
csr ed25519 "$tmp/key-ed.pem" -subj "/O=" -addext "subjectAltName=URI:$ID"
printf 'garbage' >"$tmp/g"
put csr garbage 0 "$tmp/g"

# ---- spiffe ----
i=0
for s in "$ID" spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account \
    spiffe://td/ns/a/sa/b.c-d spiffe://foo.bar_baz-1/ns/x/sa/y spiffe://td/ns/a/sa/b/ \
    spiffe://td/ns/a%2Fb/sa/c spiffe://Td/ns/a/sa/b spiffe://td/ns/a/sa/.. spiffe://td:1/ns/a/sa/b; do
    printf '\x00%s' "$s" >"$out/spiffe/id-$i"
    i=$((i + 1))
done
printf '\x01cluster.local\x00default\x00bookinfo.reviews' >"$out/spiffe/parts-0"

# ---- selector: selector line, second selector line, labels ----
i=0
while IFS= read -r -d '' s; do
    printf '%s' "$s" >"$out/selector/s-$i"
    i=$((i + 1))
done < <(printf '%s\0' \
    'istio-injection=enabled' \
    $'a=b,c!=d,e in (x,y),!f\ng notin (h)\na=b\ne=x\ng=i' \
    $'istio.io/rev\nteam==a\nistio.io/rev=canary\nteam=a' \
    $'example.com/part-of in ( a , b.c_d )\n!x\nexample.com/part-of=a' \
    $'\n\nk=v' \
    'team in ((a))')

# ---- metadata: protobuf IstioCertificateRequest (mode 0) and Struct builder bytes (mode 1) ----
python3 - "$out/metadata" <<'EOF'
import struct, sys
d = sys.argv[1]
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])
def field(num, wt, payload):
    key = varint(num << 3 | wt)
    return key + (varint(len(payload)) + payload if wt == 2 else payload)
def s(num, text):
    return field(num, 2, text.encode() if isinstance(text, str) else text)
def value(kind, v):  # google.protobuf.Value
    if kind == "null": return field(1, 0, varint(0))
    if kind == "num": return field(2, 1, struct.pack("<d", v))
    if kind == "str": return s(3, v)
    if kind == "bool": return field(4, 0, varint(int(v)))
    if kind == "struct": return s(5, v)
    if kind == "list": return s(6, v)
def struct_of(entries):  # google.protobuf.Struct: map<string, Value> fields = 1
    return b"".join(s(1, s(1, k) + s(2, val)) for k, val in entries)
csr = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
def request(meta):  # csr = 1, validity_duration = 2, metadata = 3
    return s(1, csr) + field(2, 0, varint(86400)) + (s(3, meta) if meta is not None else b"")
cases = {
    "none": None,
    "pilot-agent": struct_of([("CertSigner", value("str", ""))]),
    "signer": struct_of([("CertSigner", value("str", "clusterissuer"))]),
    "ztunnel": struct_of([("ImpersonatedIdentity", value("str", "spiffe://td/ns/a/sa/b"))]),
    "both": struct_of([("CertSigner", value("str", "x")),
                       ("ImpersonatedIdentity", value("str", "spiffe://td/ns/a/sa/b"))]),
    "number": struct_of([("CertSigner", value("num", 1.0))]),
    "null": struct_of([("CertSigner", value("null", 0))]),
    "bool": struct_of([("ImpersonatedIdentity", value("bool", True))]),
    "nested": struct_of([("CertSigner", value("struct", struct_of([("a", value("list", value("str", "b")))])))]),
    "other": struct_of([("other", value("num", 2.5)), ("CertSigner", value("str", "s"))]),
}
for name, meta in cases.items():
    open(f"{d}/pb-{name}", "wb").write(b"\x00" + request(meta))
# mode 1 (Unstructured): a few byte strings; arbitrary's choices read from the front
for i, raw in enumerate([b"\x01\x00\x00", b"\x01\x02\x01\x02\x05hello", b"\x01\x02\x00\x03",
                         b"\x01\x03\x00\x05\x01\x01\x06"]):
    open(f"{d}/tree-{i}", "wb").write(raw)
EOF

# ---- chain: a root -> intermediate -> leaf chain and a leaf of the root, as PEM and DER ----
cat >"$tmp/ext.cnf" <<EOF
[leaf]
subjectAltName = critical,URI:$ID
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
basicConstraints = critical,CA:false
authorityKeyIdentifier = keyid
[inter]
basicConstraints = critical,CA:true,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[dns]
subjectAltName = DNS:istiod.istio-system.svc,IP:10.0.0.1,URI:$ID
extendedKeyUsage = serverAuth,clientAuth
EOF
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/inter-key.pem" 2>/dev/null
cert() { # cert <name> <key> <subject> <issuer cert> <issuer key> <ext section>
    openssl req -new -key "$2" -subj "$3" -out "$tmp/$1.csr" 2>/dev/null
    openssl x509 -req -in "$tmp/$1.csr" -CA "$4" -CAkey "$5" -set_serial "0x$(openssl rand -hex 8)" \
        -days 36500 -sha256 -extfile "$tmp/ext.cnf" -extensions "$6" -out "$tmp/$1.pem" 2>/dev/null
    openssl x509 -in "$tmp/$1.pem" -outform DER -out "$tmp/$1.der"
}
cert inter "$tmp/inter-key.pem" "/O=istio-csr-rs fuzz/CN=fuzz intermediate" $fx/root.pem $fx/root-key.pem inter
cert leaf "$fx/leaf-key.pem" "/O=" "$tmp/inter.pem" "$tmp/inter-key.pem" leaf
cert direct "$fx/leaf-key.pem" "/O=" $fx/root.pem $fx/root-key.pem leaf
cert names "$fx/leaf-key.pem" "/O=" $fx/root.pem $fx/root-key.pem dns
cat "$tmp/leaf.pem" "$tmp/inter.pem" $fx/root.pem >"$tmp/chain.pem"
cat "$tmp/leaf.pem" "$tmp/inter.pem" "$tmp/inter.pem" "$tmp/leaf.pem" >"$tmp/repeats.pem"
put chain pem-chain 0 "$tmp/chain.pem"
put chain pem-repeats 0 "$tmp/repeats.pem"
put chain pem-direct 0 "$tmp/direct.pem"
put chain pem-root 0 $fx/root.pem
cat "$tmp/leaf.der" "$tmp/inter.der" >"$tmp/chain.der"
put chain der-chain 1 "$tmp/chain.der"
put chain der-direct 1 "$tmp/direct.der"
put chain der-names 1 "$tmp/names.der"
for c in direct names; do
    first "$tmp/$c.der" >"$tmp/$c.tbs"
    put chain "tbs-$c" 2 "$tmp/$c.tbs"
done
first "$tmp/inter.der" >"$tmp/inter.tbs"
cat "$tmp/direct.tbs" "$tmp/inter.tbs" >"$tmp/two.tbs"
put chain tbs-two 2 "$tmp/two.tbs"

# ---- kubeconfig: inline token, client cert, exec plugin, auth provider, file paths ----
k() { printf '%s' "$2" >"$out/kubeconfig/$1"; }
head='apiVersion: v1
kind: Config
clusters:
- name: remote
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: Zm9v
contexts:
- name: remote
  context: {cluster: remote, user: reader}
current-context: remote
users:
- name: reader
  user:
'
k token "${head}    token: abc"
k client-cert "${head}    client-certificate-data: Zm9v
    client-key-data: YmFy"
k exec "${head}    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: /bin/sh
      args: [-c, id]
      env: [{name: A, value: b}]"
k auth-provider "${head}    auth-provider:
      name: gcp
      config: {access-token: x}"
k token-file "${head}    tokenFile: /var/run/secrets/token"
k cert-files "${head}    client-certificate: /etc/cert.pem
    client-key: /etc/key.pem"
k ca-file 'clusters:
- name: c
  cluster: {server: "https://c", certificate-authority: /etc/ca.pem}
users: [{name: u, user: {username: a, password: b}}]'
k multi-doc "${head}    token: abc
---
apiVersion: v1
kind: Config
clusters: [{name: other, cluster: {server: 'https://o', insecure-skip-tls-verify: true}}]"
k json '{"apiVersion":"v1","kind":"Config","clusters":[{"name":"c","cluster":{"server":"https://c"}}],"users":[{"name":"u","user":{"token":"t"}}]}'
k anchors 'clusters:
- &c {name: c, cluster: {server: "https://c"}}
- *c
users: [{name: u, user: {token: SUPERSECRET}}]
extensions: [{name: e, extension: {a: [1, 2, {b: c}]}}]
preferences: {colors: true}'
echo "seeds written to $(pwd)/$out"
