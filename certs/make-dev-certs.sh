#!/usr/bin/env bash
# Makes a development CA and a server certificate it signs, for sipis's HTTPS
# API and its device port (TLS).
#
# usage: certs/make-dev-certs.sh [--out DIR] [NAME ...]
#
# The server certificate names localhost, 127.0.0.1 and ::1, and every NAME
# given (a host name or an IP address). Files go to DIR, else to
# $SIPIS_CERT_DIR, else to certs/dev/ beside this script:
#   ca.pem, ca.key          the development CA; kept when both exist, so that
#                           clients told to trust it keep trusting it
#   server.pem, server.key  the server certificate and its key, made anew on
#                           every run with the names given
# Keys are written with mode 0600. These files are for development only:
# certs/README.md says what production uses.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

fail() {
    echo "make-dev-certs: $*" >&2
    exit 2
}

out="${SIPIS_CERT_DIR:-$(cd "$(dirname "$0")" && pwd)/dev}"
names=()
while (($#)); do
    case "$1" in
        -o | --out)
            (($# >= 2)) || fail "$1 needs a directory"
            out="$2"
            shift 2
            ;;
        --out=*)
            out="${1#--out=}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            names+=("$@")
            break
            ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *)
            names+=("$1")
            shift
            ;;
    esac
done

# subjectAltName entries: every name is checked, since it goes into an
# OpenSSL configuration line where a comma or a newline would add entries.
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "${names[@]}"; do
    if [[ "$name" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ || "$name" =~ ^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*$ ]]; then
        san+=",IP:$name"
    elif [[ "$name" =~ ^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$ ]]; then
        san+=",DNS:$name"
    else
        fail "not a host name or IP address: $name"
    fi
done
common_name="${names[0]:-localhost}"

umask 077
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "$out/.make-dev-certs.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cat >"$work/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no

[dn]
CN = sipis development CA

[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = $san
EOF

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 0600 "$1"
}

if [[ -s "$out/ca.pem" && -s "$out/ca.key" ]]; then
    ca_state="kept"
else
    new_key "$work/ca.key"
    openssl req -x509 -new -config "$work/openssl.cnf" -extensions ca -key "$work/ca.key" \
        -sha256 -days 3650 -out "$work/ca.pem"
    chmod 0644 "$work/ca.pem"
    mv -f "$work/ca.key" "$out/ca.key"
    mv -f "$work/ca.pem" "$out/ca.pem"
    ca_state="made"
fi

new_key "$work/server.key"
openssl req -new -config "$work/openssl.cnf" -key "$work/server.key" \
    -subj "/CN=$common_name" -out "$work/server.csr"
openssl x509 -req -in "$work/server.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha256 -days 397 \
    -extfile "$work/openssl.cnf" -extensions server -out "$work/server.pem" 2>/dev/null
chmod 0644 "$work/server.pem"
mv -f "$work/server.key" "$out/server.key"
mv -f "$work/server.pem" "$out/server.pem"

cat <<EOF
Development certificates in $out:
  ca.pem      the development CA ($ca_state); clients trust it, e.g. curl --cacert $out/ca.pem
  ca.key      its private key, mode 0600 ($ca_state)
  server.pem  the server certificate for ${san//,/, } (made)
  server.key  its private key, mode 0600 (made)

Point sipis at them in its configuration:
  [api]
  certificate = "$out/server.pem"
  private_key = "$out/server.key"

  [device]
  certificate = "$out/server.pem"
  private_key = "$out/server.key"

Then: curl --cacert $out/ca.pem https://localhost:8443/healthz
EOF
