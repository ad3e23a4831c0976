#!/usr/bin/env bash
# Install, or upgrade in place, the trainfleet receiver as a systemd service (a Pi is enough).
#
#   sudo scripts/install-receiver.sh [--manifest PATH] [--host ADDR] [--port N] [--user USER]
#        [--venv DIR] [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]
#        [--worker-token-file F] [--no-start] [--dry-run] [--root DIR]
#
# Run it from the project's clone once its venv has the server extra. It checks the manifest,
# creates the system user (default trainfleet), makes an operator token in
# /etc/trainfleet/operator.token if there is none, and installs trainfleet-receiver.service
# with its state under /var/lib/trainfleet, bound to 127.0.0.1:8470 unless --host says
# otherwise. Workers need a per-host token (`trainfleet token create HOST --enroll`) unless
# --worker-token-file names a shared one. --dry-run and --root work as for the worker.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "install-receiver: $*" >&2; exit 1; }
say() { echo "==> $*"; }

CLONE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MANIFEST=$CLONE/etc/training_manifest.toml HOST=127.0.0.1 PORT=8470 RUN_AS=trainfleet
VENV=$CLONE/.venv TLS_CERT="" TLS_KEY="" TLS_CLIENT_CA="" WORKER_TOKEN_FILE="" START=1 DRY=0
ROOT=""
while [ $# -gt 0 ]; do
  case $1 in
    --manifest|--host|--port|--user|--venv|--tls-cert|--tls-key|--tls-client-ca|\
    --worker-token-file|--root)
      [ $# -ge 2 ] || die "$1 needs a value"
      case $1 in
        --manifest) MANIFEST=$2;; --host) HOST=$2;; --port) PORT=$2;; --user) RUN_AS=$2;;
        --venv) VENV=$2;; --tls-cert) TLS_CERT=$2;; --tls-key) TLS_KEY=$2;;
        --tls-client-ca) TLS_CLIENT_CA=$2;; --worker-token-file) WORKER_TOKEN_FILE=$2;;
        --root) ROOT=$2;;
      esac
      shift 2;;
    --no-start) START=0; shift;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage 0;;
    *) echo "install-receiver: unknown option $1" >&2; usage 2;;
  esac
done

TF=$VENV/bin/trainfleet
SERVICE=trainfleet-receiver.service
UNIT=$ROOT/etc/systemd/system/$SERVICE
OPERATOR_TOKEN=/etc/trainfleet/operator.token

run() { if [ "$DRY" = 1 ]; then echo "would run: $*"; else "$@"; fi; }

[ -x "$TF" ] || die "no trainfleet in $VENV: create the venv first" \
  "(python3 -m venv .venv && .venv/bin/pip install -e '.[server]'), or pass --venv DIR"
"$VENV/bin/python" -c 'import fastapi, uvicorn' 2>/dev/null \
  || die "the venv lacks the server extra: $VENV/bin/pip install -e '.[server]'"
if [ "$DRY" = 0 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
  die "run it as root (sudo), or try --dry-run first"
fi
[ -f "$MANIFEST" ] || die "--manifest $MANIFEST: no such file (copy" \
  "etc/training_manifest.toml.example and edit it)"
MANIFEST=$(cd "$(dirname "$MANIFEST")" && pwd)/$(basename "$MANIFEST")
say "checking $MANIFEST"
"$TF" manifest check "$MANIFEST" | tail -n 1

if ! id -u "$RUN_AS" >/dev/null 2>&1; then
  if [ -n "$ROOT" ]; then
    say "user $RUN_AS does not exist; create it on the target system"
  else
    run useradd --system --home-dir /var/lib/trainfleet --shell /usr/sbin/nologin "$RUN_AS"
  fi
fi
OWNER="root:$RUN_AS"
if [ -n "$ROOT" ] && ! id -u "$RUN_AS" >/dev/null 2>&1; then OWNER=root; fi
if [ "$DRY" = 0 ] && [ -z "$ROOT" ]; then
  for path in "$MANIFEST" "$TF"; do
    runuser -u "$RUN_AS" -- test -r "$path" \
      || die "$RUN_AS cannot read $path: keep the clone where the service account can read it"
  done
fi

if [ -s "$ROOT$OPERATOR_TOKEN" ]; then
  say "keeping the operator token in $ROOT$OPERATOR_TOKEN"
elif [ "$DRY" = 1 ]; then
  echo "would write $ROOT$OPERATOR_TOKEN (mode 640, owner $OWNER): a new random token"
else
  mkdir -p "$(dirname "$ROOT$OPERATOR_TOKEN")"
  (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))' \
    > "$ROOT$OPERATOR_TOKEN")
  chown "$OWNER" "$ROOT$OPERATOR_TOKEN"
  chmod 640 "$ROOT$OPERATOR_TOKEN"
  say "wrote a new operator token to $ROOT$OPERATOR_TOKEN"
fi

args=(--manifest "$MANIFEST" --host "$HOST" --port "$PORT" --operator-token-file "$OPERATOR_TOKEN")
if [ -n "$WORKER_TOKEN_FILE" ]; then
  args+=(--worker-token-file "$WORKER_TOKEN_FILE")
else
  args+=(--require-worker-token)
fi
[ -z "$TLS_CERT" ] || args+=(--tls-cert "$TLS_CERT" --tls-key "$TLS_KEY")
[ -z "$TLS_CLIENT_CA" ] || args+=(--tls-client-ca "$TLS_CLIENT_CA")

say "service: $UNIT"
content=$("$TF" install systemd-unit receiver --exec "$TF" --user "$RUN_AS" -- "${args[@]}")
if [ "$DRY" = 1 ]; then
  printf 'would write %s (mode 644, owner root):\n%s\n' "$UNIT" "$content" | sed '2,$s/^/    /'
elif [ -f "$UNIT" ] && [ "$(cat "$UNIT")" = "$content" ]; then
  echo "unchanged: $UNIT"
else
  mkdir -p "$(dirname "$UNIT")"
  printf '%s\n' "$content" > "$UNIT.tmp" && mv "$UNIT.tmp" "$UNIT" && chmod 644 "$UNIT"
  echo "wrote: $UNIT"
fi

if [ -n "$ROOT" ]; then
  run systemctl --root="$ROOT" enable "$SERVICE"
else
  run systemctl daemon-reload
  run systemctl enable "$SERVICE"
  if [ "$START" = 1 ]; then run systemctl restart "$SERVICE"; fi
fi

SCHEME=http
[ -z "$TLS_CERT" ] || SCHEME=https
cat <<EOF
==> done: the receiver listens on $SCHEME://$HOST:$PORT and keeps its state in /var/lib/trainfleet
    logs:     journalctl -u trainfleet-receiver -f
    operator: export TRAINFLEET_OPERATOR_TOKEN=\$(sudo cat $OPERATOR_TOKEN)
              export TRAINFLEET_RECEIVER=$SCHEME://$HOST:$PORT
    a host:   trainfleet token create HOST --enroll   (then run the worker installer there)
    backup:   sudo -u $RUN_AS $TF backup /var/backups/trainfleet --state-dir /var/lib/trainfleet
EOF
if [ -z "$TLS_CERT" ]; then
  cat <<EOF
    TLS:      to serve HTTPS, re-run with --tls-cert CERT.pem --tls-key KEY.pem (files readable
              by $RUN_AS; add --tls-client-ca CA.pem to require client certificates), then give
              workers https://... and, for a private CA, --ca CA.pem (or ca_file in worker.toml).
EOF
fi
