#!/usr/bin/env bash
# One entry point for people, CI and the README: ./scripts/dev.sh run|test|lint|services|setup
# Each command does its own set-up: uv (installed if missing), `uv sync`, and the
# services it needs (started when installed but stopped; a clear line when absent).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[herald]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[herald]\033[0m %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port seconds
  local i
  for ((i = 0; i < $3 * 4; i++)); do port_open "$1" "$2" && return 0; sleep 0.25; done
  return 1
}

ensure_uv() {
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv >/dev/null 2>&1; then
    say "installing uv"
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
  fi
  command -v uv >/dev/null 2>&1 || die "could not install uv; see https://docs.astral.sh/uv/"
  uv sync --frozen --quiet
}

ensure_rabbitmq() {
  port_open 127.0.0.1 5672 && return 0
  if command -v rabbitmq-server >/dev/null 2>&1; then
    say "RabbitMQ is installed but stopped: starting it (rabbitmq-server -detached)"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_port 127.0.0.1 5672 90 || die "RabbitMQ did not come up on 127.0.0.1:5672 within 90s"
    return 0
  fi
  die "no RabbitMQ on 127.0.0.1:5672 and none installed: run \`docker compose up -d rabbitmq\` (or set HERALD_AMQP_URL)"
}

ensure_postgres() {
  port_open 127.0.0.1 5432 && return 0
  if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null 2>&1; then
    say "PostgreSQL is installed but stopped: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_port 127.0.0.1 5432 60 || die "PostgreSQL did not come up on 127.0.0.1:5432"
    return 0
  fi
  die "no PostgreSQL on 127.0.0.1:5432: run \`docker compose up -d postgres\`"
}

ensure_redis() {
  port_open 127.0.0.1 6379 && return 0
  if command -v redis-server >/dev/null 2>&1; then
    say "Redis is installed but stopped: starting it"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    wait_port 127.0.0.1 6379 30 || die "Redis did not come up on 127.0.0.1:6379"
    return 0
  fi
  die "no Redis on 127.0.0.1:6379: run \`docker compose up -d redis\`"
}

ensure_chromium() { # the inbox page is tested in Debian's headless Chromium
  [ -x /usr/bin/chromium ] && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing Debian's chromium for the inbox page tests"
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 \
      && apt-get install -y -q chromium >/dev/null 2>&1; } || say "could not install chromium"
  fi
  [ -x /usr/bin/chromium ] || say "no /usr/bin/chromium: the browser tests skip (and fail in CI)"
}

cmd_lint() {
  ensure_uv
  say "ruff"; uv run ruff check .
  say "mypy"; uv run mypy
}

cmd_test() {
  ensure_uv
  ensure_rabbitmq; ensure_postgres; ensure_redis; ensure_chromium
  export HERALD_TEST_AMQP_URL="${HERALD_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
  export HERALD_TEST_POSTGRES_URL="${HERALD_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}"
  export HERALD_TEST_REDIS_URL="${HERALD_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
  cmd_lint
  say "pytest"
  uv run pytest -n "${HERALD_TEST_WORKERS:-4}" "$@"
}

cmd_run() {
  ensure_uv
  case "${HERALD_AMQP_URL:-}" in
    "" | *localhost* | *127.0.0.1*) ensure_rabbitmq ;;
  esac
  exec uv run herald run "$@"
}

case "${1:-}" in
  run) shift; cmd_run "$@" ;;
  test) shift; cmd_test "$@" ;;
  lint) cmd_lint ;;
  setup) ensure_uv ;;
  services) ensure_rabbitmq; ensure_postgres; ensure_redis; say "RabbitMQ, PostgreSQL and Redis are up" ;;
  *) echo "usage: $0 run|test|lint|setup|services" >&2; exit 2 ;;
esac
