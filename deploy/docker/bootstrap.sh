#!/bin/sh
# spo3-bootstrap: the one-shot step before a distributed run (compose service `bootstrap`,
# Kubernetes Job `bootstrap`). Idempotent, so it may run again at every `up`:
#   1. a policy model in $SPO3_MODEL unless one is there (a small model made on the spot; put a
#      real Hugging Face checkpoint there instead, e.g. Qwen2.5-1.5B-Instruct, for real training),
#   2. tasks on the run's work queue unless the queue has seen items already:
#      $SPO3_TASKS (space-separated task ids) if set, else generated TextWorld games.
set -eu

: "${SPO3_REDIS_URL:?SPO3_REDIS_URL must be set}"
RUN_ID="${SPO3_RUN:-default}"
MODEL="${SPO3_MODEL:-/shared/model}"
ENV_NAME="${SPO3_ENV:-textworld}"
GAMES_DIR="${SPO3_GAMES_DIR:-/shared/games}"

if [ -f "$MODEL/config.json" ]; then
    echo "bootstrap: model present in $MODEL"
else
    echo "bootstrap: no model in $MODEL; making a ${SPO3_MODEL_PRESET:-small} one"
    spo3 init-model "$MODEL" --preset "${SPO3_MODEL_PRESET:-small}" --seed "${SPO3_SEED:-0}"
fi

# Exit 0 when the run's work queue has never held an item (ready, leased or done), 3 when it has.
set +e
python - <<'PY'
import os, sys
from spo3.transport.connection import check_reachable, connect
from spo3.transport.work_queue import WorkQueue

url = os.environ["SPO3_REDIS_URL"]
client = connect(url, retries=10)
check_reachable(client, url)
counts = WorkQueue(client, os.environ.get("SPO3_RUN", "default")).counts()
print(f"bootstrap: work queue of run {os.environ.get('SPO3_RUN', 'default')!r}: {counts}")
sys.exit(0 if sum(counts.values()) == 0 else 3)
PY
status=$?
set -e
case $status in
    0) ;;
    3) echo "bootstrap: tasks were queued before; nothing to enqueue"; exit 0 ;;
    *) echo "bootstrap: cannot read the work queue (exit $status)" >&2; exit "$status" ;;
esac

if [ -n "${SPO3_TASKS:-}" ]; then
    TASKS="$SPO3_TASKS"
elif [ "$ENV_NAME" = textworld ]; then
    settings=""
    for kv in ${SPO3_GAMES_SETTINGS:-level=3}; do settings="$settings --setting $kv"; done
    # shellcheck disable=SC2086
    TASKS=$(spo3 make-games "$GAMES_DIR" --kind "${SPO3_GAMES_KIND:-tw-coin_collector}" \
        --n "${SPO3_GAMES_N:-8}" --seed "${SPO3_SEED:-0}" $settings)
else
    echo "bootstrap: SPO3_ENV=$ENV_NAME needs explicit task ids in SPO3_TASKS" >&2
    exit 2
fi

# shellcheck disable=SC2086
spo3 enqueue "$ENV_NAME" $TASKS --run "$RUN_ID" --algo "${SPO3_ALGO:-3spo}" --repeat "${SPO3_REPEAT:-100}"
