#!/usr/bin/env bash
# Certificates for the TLS variant (`fedlr deploy compose --tls`) and SuperNode
# keys for authentication (`--auth`). Writes deploy/certs/ and deploy/keys/.
#   deploy/gen-certs.sh [NODES] [EXTRA_SAN ...]   e.g. deploy/gen-certs.sh 2 DNS:link.example.org IP:10.0.0.5
# Put the SuperLink's public name or address in EXTRA_SAN when SuperNodes on
# other machines connect to it.
set -euo pipefail
cd "$(dirname "$0")"
nodes="${1:-2}"; shift || true
san="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for extra in "$@"; do san="$san,$extra"; done
mkdir -p certs keys
openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -subj "/CN=fedlr-ca" \
  -keyout certs/ca.key -out certs/ca.crt 2>/dev/null
openssl req -newkey rsa:4096 -nodes -subj "/CN=superlink" -keyout certs/server.key -out certs/server.csr 2>/dev/null
printf 'subjectAltName=%s\n' "$san" > certs/server.ext
openssl x509 -req -in certs/server.csr -CA certs/ca.crt -CAkey certs/ca.key -CAcreateserial \
  -days 365 -sha256 -extfile certs/server.ext -out certs/server.pem 2>/dev/null
rm -f certs/server.csr certs/server.ext
for ((i = 0; i < nodes; i++)); do
  rm -f "keys/supernode-$i" "keys/supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -f "keys/supernode-$i" -C "supernode-$i"
done
echo "certs: $(pwd)/certs  keys: $(pwd)/keys"
echo "register each SuperNode once the SuperLink runs: flwr supernode register keys/supernode-<i>.pub <connection>"
