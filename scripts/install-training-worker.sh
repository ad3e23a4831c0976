#!/usr/bin/env bash
# Install, or upgrade in place, the trainfleet worker as a systemd service on this host.
#
#   sudo scripts/install-training-worker.sh --receiver URL --code CODE [--user USER]
#        [--workdir DIR] [--venv DIR] [--shutdown-grace S] [--no-start] [--dry-run] [--root DIR]
#
# Run it from the project's clone once its venv exists. It self-tests the host, enrols it with
# the one-time CODE (`trainfleet token create HOST --enroll` on the operator's side), keeps the
# token in /etc/trainfleet/worker.toml (0600, owned by USER), installs trainfleet-worker.service,
# enables and (re)starts it. Without --code a re-run keeps the token and upgrades in place.
# --dry-run prints every file it would write and every command it would run, and changes
# nothing. --root DIR writes under DIR and starts nothing (tests, image builds).
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "install-training-worker: $*" >&2; exit 1; }
say() { echo "==> $*"; }

CLONE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RECEIVER="" CODE="" RUN_AS="" WORKDIR=$CLONE VENV=$CLONE/.venv GRACE=30 START=1 DRY=0 ROOT=""
while [ $# -gt 0 ]; do
  case $1 in
    --receiver|--code|--user|--workdir|--venv|--shutdown-grace|--root)
      [ $# -ge 2 ] || die "$1 needs a value"
      case $1 in
        --receiver) RECEIVER=$2;; --code) CODE=$2;; --user) RUN_AS=$2;;
        --workdir) WORKDIR=$2;; --venv) VENV=$2;; --shutdown-grace) GRACE=$2;; --root) ROOT=$2;;
      esac
      shift 2;;
    --no-start) START=0; shift;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage 0;;
    *) echo "install-training-worker: unknown option $1" >&2; usage 2;;
  esac
done

TF=$VENV/bin/trainfleet
SERVICE=trainfleet-worker.service
CONFIG=/etc/trainfleet/worker.toml          # as the service sees it
STATE_DIR=/var/lib/trainfleet-worker        # systemd's StateDirectory=, owned by USER
UNIT=$ROOT/etc/systemd/system/$SERVICE
HOST_CONFIG=$ROOT$CONFIG                    # where this run writes it

# Run a command that changes the system, or only show it.
run() { if [ "$DRY" = 1 ]; then echo "would run: $*"; else "$@"; fi; }

# Write stdin to a file with a mode and owner, unless it already holds exactly that.
write_file() {
  local path=$1 mode=$2 owner=$3 content
  content=$(cat)
  if [ "$DRY" = 1 ]; then
    printf 'would write %s (mode %s, owner %s):\n%s\n' "$path" "$mode" "$owner" "$content" \
      | sed '2,$s/^/    /'
    return 0
  fi
  if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then
    echo "unchanged: $path"
  else
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" > "$path.tmp"
    mv "$path.tmp" "$path"
    echo "wrote: $path"
  fi
  chmod "$mode" "$path"
  chown "$owner" "$path"
}

[ -x "$TF" ] || die "no trainfleet in $VENV: create the venv first" \
  "(python3 -m venv .venv && .venv/bin/pip install -e .), or pass --venv DIR"
[ -d "$WORKDIR" ] || die "--workdir $WORKDIR: no such directory"
WORKDIR=$(cd "$WORKDIR" && pwd)
if [ "$DRY" = 0 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
  die "run it as root (sudo), or try --dry-run first"
fi
RUN_AS=${RUN_AS:-${SUDO_USER:-$(stat -c %U "$WORKDIR")}}
[ "$RUN_AS" != root ] || die "the worker must not run as root: pass --user USER" \
  "(an account that can read $WORKDIR and $VENV)"
id -u "$RUN_AS" >/dev/null 2>&1 || die "--user $RUN_AS: no such user"

say "self-test: trainfleet capability --workdir $WORKDIR"
if ! CAPABILITY=$("$TF" capability --workdir "$WORKDIR"); then
  die "the self-test failed (see above): fix this host, then run the installer again"
fi
SUMMARY=$(printf '%s' "$CAPABILITY" | "$VENV/bin/python" -c 'import json, sys
c = json.load(sys.stdin)
gpus = ", ".join("%s %g GiB" % (g["name"], g["vram_gib"]) for g in c["gpus"]) or "none"
print(c["hostname"])
print("host %s: %s cores, %g GiB RAM, GPUs: %s"
      % (c["hostname"], c["cpu_count"], c["ram_gib"], gpus))')
HOSTNAME_SEEN=$(printf '%s\n' "$SUMMARY" | head -n 1)
printf '    %s\n' "$(printf '%s\n' "$SUMMARY" | tail -n 1)"

ENROLLED=0
if [ -f "$HOST_CONFIG" ] && grep -q '^token = ' "$HOST_CONFIG"; then ENROLLED=1; fi
if [ -n "$CODE" ] && [ "$ENROLLED" = 0 ]; then
  [ -n "$RECEIVER" ] || die "--code needs --receiver URL"
  say "enrolling $HOSTNAME_SEEN with $RECEIVER"
  enroll=("$TF" enroll --receiver "$RECEIVER" --code "$CODE" --hostname "$HOSTNAME_SEEN"
          --config "$HOST_CONFIG" --workdir "$WORKDIR" --state-dir "$STATE_DIR")
  if [ "$DRY" = 1 ]; then
    echo "would run: ${enroll[*]/#$CODE/<code>}"
    echo "would write $HOST_CONFIG (mode 600, owner $RUN_AS): receiver, token, workdir, state_dir"
  else
    mkdir -p "$(dirname "$HOST_CONFIG")"
    "${enroll[@]}"
  fi
elif [ "$ENROLLED" = 1 ]; then
  say "already enrolled: keeping the token in $HOST_CONFIG (upgrade in place;" \
    "to enrol again, revoke the host and delete that file first)"
else
  die "no --code and no $HOST_CONFIG yet: on the operator's machine run" \
    "'trainfleet token create $HOSTNAME_SEEN --enroll', then pass --receiver URL --code CODE"
fi
run chown "$RUN_AS" "$HOST_CONFIG"
run chmod 600 "$HOST_CONFIG"

say "service: $UNIT"
"$TF" install systemd-unit worker --exec "$TF" --user "$RUN_AS" --config "$CONFIG" \
  --workdir "$WORKDIR" --shutdown-grace "$GRACE" | write_file "$UNIT" 644 root

if [ -n "$ROOT" ]; then
  run systemctl --root="$ROOT" enable "$SERVICE"
  say "installed under $ROOT; nothing started"
else
  run systemctl daemon-reload
  run systemctl enable "$SERVICE"
  if [ "$START" = 1 ]; then run systemctl restart "$SERVICE"; fi
fi

cat <<EOF
==> done: the worker runs as $RUN_AS in $WORKDIR and starts at boot
    logs:      journalctl -u trainfleet-worker -f
    status:    systemctl status trainfleet-worker
    upgrade:   git pull && $VENV/bin/pip install -e . && sudo $0
    uninstall: sudo $CLONE/scripts/uninstall-training-worker.sh
EOF
