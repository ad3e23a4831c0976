#!/usr/bin/env bash
# Remove what install-training-worker.sh added, and nothing else.
#
#   sudo scripts/uninstall-training-worker.sh [--keep-config] [--purge [--force]] [--dry-run]
#        [--root DIR]
#
# Stops and disables trainfleet-worker.service (the worker reports a graceful shutdown, so its
# job goes back to the queue), removes the unit and /etc/trainfleet/worker.toml (its token),
# and /etc/trainfleet itself only if nothing else is left there. The state directory
# /var/lib/trainfleet-worker is kept unless --purge; --purge refuses while the spool holds a
# trained model not yet delivered, unless --force. Revoke the host's token on the receiver too.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "uninstall-training-worker: $*" >&2; exit 1; }
say() { echo "==> $*"; }

KEEP_CONFIG=0 PURGE=0 FORCE=0 DRY=0 ROOT=""
while [ $# -gt 0 ]; do
  case $1 in
    --keep-config) KEEP_CONFIG=1; shift;;
    --purge) PURGE=1; shift;;
    --force) FORCE=1; shift;;
    --dry-run) DRY=1; shift;;
    --root) [ $# -ge 2 ] || die "--root needs a value"; ROOT=$2; shift 2;;
    -h|--help) usage 0;;
    *) echo "uninstall-training-worker: unknown option $1" >&2; usage 2;;
  esac
done

SERVICE=trainfleet-worker.service
UNIT=$ROOT/etc/systemd/system/$SERVICE
CONFIG=$ROOT/etc/trainfleet/worker.toml
STATE_DIR=$ROOT/var/lib/trainfleet-worker

run() { if [ "$DRY" = 1 ]; then echo "would run: $*"; else "$@"; fi; }
if [ "$DRY" = 0 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
  die "run it as root (sudo), or try --dry-run first"
fi

if [ -f "$UNIT" ]; then
  if [ -n "$ROOT" ]; then
    run systemctl --root="$ROOT" disable "$SERVICE"
  else
    say "stopping the worker (it hands its job back to the queue)"
    run systemctl disable --now "$SERVICE"
  fi
  run rm -f "$UNIT"
  [ -n "$ROOT" ] || run systemctl daemon-reload
else
  say "no $UNIT: the service is not installed"
fi

if [ "$KEEP_CONFIG" = 0 ] && [ -f "$CONFIG" ]; then
  run rm -f "$CONFIG"
  # The directory goes only when the config was all it held (a CA file, say, stays).
  if [ -z "$(ls -A "$(dirname "$CONFIG")" | grep -vx worker.toml)" ]; then
    run rmdir "$(dirname "$CONFIG")"
  fi
fi

if [ "$PURGE" = 1 ] && [ -d "$STATE_DIR" ]; then
  if compgen -G "$STATE_DIR/spool/*.json" >/dev/null && [ "$FORCE" = 0 ]; then
    die "$STATE_DIR/spool holds trained models not yet delivered: start the worker until" \
      "they are, or pass --force to delete them"
  fi
  run rm -rf "$STATE_DIR"
elif [ -d "$STATE_DIR" ]; then
  say "kept $STATE_DIR (its spool and job outputs); --purge removes it"
fi

say "done. On the operator's side, revoke this host's token:"
echo "    trainfleet token revoke $(hostname)"
