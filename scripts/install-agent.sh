#!/bin/sh
# Install the restic-manager agent on a Linux host with systemd.
#   curl -fsSL http://SERVER:8081/agent/install.sh | sudo sh -s -- --server ws://SERVER:8081 --token TOKEN
# or, with the agent plane on TLS (certificate from a private CA, ca.pem copied to the host first):
#   curl --cacert ca.pem -fsSL https://SERVER:8081/agent/install.sh \
#       | sudo sh -s -- --server wss://SERVER:8081 --token TOKEN --server-ca ca.pem
# Downloads the server's current agent (checking its sha256), installs the start-up guard, writes
# the config (pinning the release public key), installs and starts the systemd unit. Re-running
# it upgrades the unit and the program in place.
#   --release-key KEY   base64 ed25519 release public key to pin (default: the server's
#                       X-Release-Public-Key header on the download, if it sends one)
#   --allow-unsigned    accept unsigned self-updates when no key is pinned (labs only)
#   --server-ca FILE    PEM CA certificate to pin for a wss:// server: the downloads here and the
#                       agent (link and updates) trust only it, not the system store; it is copied
#                       into the state directory and named as server_ca in the config
set -eu

SERVER=""
TOKEN=""
RELEASE_KEY=""
ALLOW_UNSIGNED=""
SERVER_CA=""
# The locations can be moved (packaging, tests); the unit file expects these defaults.
STATE_DIR="${RM_AGENT_STATE_DIR:-/var/lib/restic-manager-agent}"
CONF_DIR="${RM_AGENT_CONF_DIR:-/etc/restic-manager-agent}"
UNIT="${RM_AGENT_UNIT_PATH:-/etc/systemd/system/restic-manager-agent.service}"
SYSTEMCTL="${RM_AGENT_SYSTEMCTL:-systemctl}"

die() { echo "install-agent: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --server) SERVER="${2:-}"; shift 2 ;;
        --token) TOKEN="${2:-}"; shift 2 ;;
        --release-key) RELEASE_KEY="${2:-}"; shift 2 ;;
        --allow-unsigned) ALLOW_UNSIGNED=1; shift ;;
        --server-ca) SERVER_CA="${2:-}"; shift 2 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[ -n "$SERVER" ] || die "--server ws://HOST:PORT is required"
[ -n "$TOKEN" ] || die "--token TOKEN is required"
case "$SERVER" in
    ws://*) HTTP="http://${SERVER#ws://}" ;;
    wss://*) HTTP="https://${SERVER#wss://}" ;;
    *) die "--server must start with ws:// or wss://" ;;
esac
if [ -n "$SERVER_CA" ]; then
    case "$SERVER" in
        wss://*) ;;
        *) die "--server-ca needs a wss:// --server (a plain link checks no certificate)" ;;
    esac
    [ -f "$SERVER_CA" ] && [ -r "$SERVER_CA" ] || die "--server-ca $SERVER_CA: no such readable file"
    grep -q -- "-----BEGIN CERTIFICATE-----" "$SERVER_CA" || die "--server-ca $SERVER_CA: not a PEM certificate"
fi
# every download checks the server's certificate: against the pinned CA if given, else the system store
fetch() {
    if [ -n "$SERVER_CA" ]; then curl --cacert "$SERVER_CA" "$@"; else curl "$@"; fi
}
[ "$(id -u)" = 0 ] || [ -n "${RM_AGENT_STATE_DIR:-}" ] || die "run as root (sudo)"
command -v python3 >/dev/null || die "python3 is required"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 3.11 or newer is required"
command -v "$SYSTEMCTL" >/dev/null || die "systemd is required"

mkdir -p "$STATE_DIR" "$CONF_DIR"
chmod 750 "$STATE_DIR" "$CONF_DIR"
tmp="$STATE_DIR/restic-manager-agent.pyz.new"
headers="$STATE_DIR/.download-headers"
fetch -fsS -D "$headers" -H "Authorization: Bearer $TOKEN" -o "$tmp" "$HTTP/agent/download/current" \
    || die "download failed (wrong token or server unreachable?)"
want=$(tr -d '\r' < "$headers" | awk 'tolower($1)=="x-checksum-sha256:" {print $2}')
got=$(sha256sum "$tmp" | cut -d' ' -f1)
[ -n "$RELEASE_KEY" ] || RELEASE_KEY=$(tr -d '\r' < "$headers" | awk 'tolower($1)=="x-release-public-key:" {print $2}')
rm -f "$headers"
[ -n "$want" ] && [ "$want" = "$got" ] || { rm -f "$tmp"; die "checksum mismatch (want $want, got $got)"; }
case "$RELEASE_KEY" in
    *[!A-Za-z0-9+/=]*) rm -f "$tmp"; die "--release-key must be base64" ;;
esac
mv -f "$tmp" "$STATE_DIR/restic-manager-agent.pyz"
# the guard runs before every start (ExecStartPre=): it rolls back a new program that cannot start
python3 "$STATE_DIR/restic-manager-agent.pyz" --install-guard "$STATE_DIR" >/dev/null \
    || die "could not install the start-up guard"

if [ -n "$SERVER_CA" ]; then
    # copied, not referenced: the agent must not depend on where the installer's file lay
    cp "$SERVER_CA" "$STATE_DIR/server-ca.pem.new"
    chmod 644 "$STATE_DIR/server-ca.pem.new"
    mv -f "$STATE_DIR/server-ca.pem.new" "$STATE_DIR/server-ca.pem"
fi

umask 077
cat > "$CONF_DIR/agent.toml" <<CONF
server_url = "$SERVER"
token = "$TOKEN"
state_dir = "$STATE_DIR"
CONF
if [ -n "$SERVER_CA" ]; then
    echo "server_ca = \"$STATE_DIR/server-ca.pem\"" >> "$CONF_DIR/agent.toml"
fi
if [ -n "$RELEASE_KEY" ]; then
    echo "release_public_key = \"$RELEASE_KEY\"" >> "$CONF_DIR/agent.toml"
elif [ -n "$ALLOW_UNSIGNED" ]; then
    echo "allow_unsigned_updates = true" >> "$CONF_DIR/agent.toml"
    echo "install-agent: WARNING: unsigned self-updates allowed (no release key pinned)" >&2
else
    echo "install-agent: no release key pinned: this agent will not update itself" \
        "(re-run with --release-key KEY, or --allow-unsigned in a lab)" >&2
fi

if [ -f /usr/share/restic-manager-agent/restic-manager-agent.service ]; then
    cp /usr/share/restic-manager-agent/restic-manager-agent.service "$UNIT"
else
    fetch -fsS -o "$UNIT" "$HTTP/agent/restic-manager-agent.service" || die "could not fetch the unit file"
fi
"$SYSTEMCTL" daemon-reload
"$SYSTEMCTL" enable --now restic-manager-agent.service
"$SYSTEMCTL" restart restic-manager-agent.service
echo "restic-manager agent installed; status: systemctl status restic-manager-agent"
