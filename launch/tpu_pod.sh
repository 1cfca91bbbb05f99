#!/bin/bash
# Train on a Cloud TPU VM slice (e.g. v5e-32: 8 hosts x 4 chips) with gcloud.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [options] [ACTION ...] [-- TRAINER ARGS ...]
#
# Actions (run in this order; default: up):
#   create    create the slice (gcloud compute tpus tpu-vm create; with --slices N > 1 a queued
#             resource with N slices named NAME-0 .. NAME-(N-1))
#   stop      stop stale trainer processes on every worker (they hold the TPU chips)
#   copy      copy this repository (git-tracked + untracked, not ignored files) to every worker
#   install   create a venv on every worker and `pip install -e .[gcs]` plus jax[tpu]
#   train     run `python -m trainer.train TRAINER ARGS` on all workers at once (--worker=all);
#             output goes to the terminal and to ~/seq2seq-logs/train.log on each worker
#   logs      fetch every worker's log into --logs-dir (default ./tpu-logs/NAME/)
#   delete    delete the slice (or the queued resource)
#   up        stop + copy + install + train + logs (plus create with --create, delete with --delete)
#
# Options:
#   --name NAME              TPU VM (or, with --slices, queued resource and node prefix) name
#   --zone ZONE              e.g. us-west4-a
#   --project PROJECT        default: gcloud's configured project
#   --accelerator-type TYPE  default v5litepod-32 (TPU v5e, 32 chips, 8 hosts)
#   --version RUNTIME        TPU software version, default v2-alpha-tpuv5-lite
#   --slices N               multi-slice over DCN (queued resources), default 1
#   --spot                   create Spot capacity
#   --service-account SA     the VMs' service account (default: the project's Compute Engine default);
#                            it needs write access to the bucket holding the workdir
#   --max-restarts N         restart training after a hang (exit code 7) up to N times, default 3
#   --create / --delete      with `up`: create the slice first / delete it at the end
#   --remote-dir DIR         where the code goes on the workers, default seq2seq (under $HOME)
#   --logs-dir DIR           local folder for `logs`
#   --background             `train` detaches (nohup) instead of streaming; use `logs` later
#   --dry-run                print every gcloud command instead of running it
#
# Example (the README's v5e-32 command):
#   launch/tpu_pod.sh --name my-v5e --zone us-west4-a --create up -- \
#       configs/hardware/tpu_v5e_32.yaml workdir=gs://my-bucket/runs/v5e
#
# The workdir is a gs:// bucket path every worker writes directly (checkpoints collectively,
# metrics by process 0); the VMs are created with the cloud-platform scope, so their service
# account's IAM role on the bucket (e.g. roles/storage.objectUser) is what grants access.
# jax.distributed.initialize() auto-detects the slice (worker id and coordinator from the TPU
# metadata); for multi-slice, the TPU runtime of a queued resource sets the MEGASCALE_* variables
# itself, see the README (Multi-host training).

set -euo pipefail

NAME=""; ZONE=""; PROJECT=""
ACCEL="v5litepod-32"; VERSION="v2-alpha-tpuv5-lite"; SLICES=1; MAX_RESTARTS=3
SPOT=0; CREATE=0; DELETE=0; DRY=0; BACKGROUND=0; SERVICE_ACCOUNT=""
REMOTE_DIR="seq2seq"; LOGS_DIR=""
ACTIONS=(); TRAIN_ARGS=()

usage() { sed -n '2,44p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --name) NAME=$2; shift 2 ;;
        --zone) ZONE=$2; shift 2 ;;
        --project) PROJECT=$2; shift 2 ;;
        --accelerator-type) ACCEL=$2; shift 2 ;;
        --version) VERSION=$2; shift 2 ;;
        --slices) SLICES=$2; shift 2 ;;
        --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
        --spot) SPOT=1; shift ;;
        --service-account) SERVICE_ACCOUNT=$2; shift 2 ;;
        --create) CREATE=1; shift ;;
        --delete) DELETE=1; shift ;;
        --remote-dir) REMOTE_DIR=$2; shift 2 ;;
        --logs-dir) LOGS_DIR=$2; shift 2 ;;
        --background) BACKGROUND=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; TRAIN_ARGS=("$@"); break ;;
        create|stop|copy|install|train|logs|delete|up) ACTIONS+=("$1"); shift ;;
        *) echo "tpu_pod.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$NAME" ] || { echo "tpu_pod.sh: --name is required" >&2; exit 2; }
[ -n "$ZONE" ] || { echo "tpu_pod.sh: --zone is required" >&2; exit 2; }
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "tpu_pod.sh: --slices must be >= 1" >&2; exit 2; }
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: --max-restarts must be >= 0" >&2; exit 2; }
[ ${#ACTIONS[@]} -gt 0 ] || ACTIONS=(up)
LOGS_DIR=${LOGS_DIR:-tpu-logs/$NAME}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

COMMON=(--zone="$ZONE")
[ -n "$PROJECT" ] && COMMON+=(--project="$PROJECT")

# Nodes: one TPU VM, or the N slices of a queued resource.
NODES=()
if [ "$SLICES" -gt 1 ]; then
    for ((i = 0; i < SLICES; i++)); do NODES+=("$NAME-$i"); done
else
    NODES=("$NAME")
fi

shell_quote() {  # a readable, copy-pasteable quoting: plain words as they are, others in '...'
    local out=() a
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a")
        else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}

run() {   # run CMD...: print it (dry run) or run it
    if [ "$DRY" = 1 ]; then
        shell_quote "$@"
    else
        echo "+ $(shell_quote "$@")" >&2
        "$@"
    fi
}

remote() {  # remote NODE COMMAND: run a shell command on every worker of NODE
    run gcloud compute tpus tpu-vm ssh "$1" "${COMMON[@]}" --worker=all --command="$2"
}

workers_of() {  # number of hosts in a slice of $ACCEL (for fetching logs worker by worker)
    local gen=${ACCEL%%-*} n=${ACCEL##*-}
    case "$gen" in
        v5litepod|v6e) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 4)); fi ;;  # chips, 4 per host
        v4|v5p) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 8)); fi ;;         # cores, 8 per host
        v2|v3) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 8)); fi ;;
        *) echo 1 ;;
    esac
}

do_create() {
    local extra=()
    [ "$SPOT" = 1 ] && extra=(--spot)
    # Read-write access to Cloud Storage for the workdir: the full scope, limited by IAM.
    extra+=(--scopes=https://www.googleapis.com/auth/cloud-platform)
    [ -n "$SERVICE_ACCOUNT" ] && extra+=(--service-account="$SERVICE_ACCOUNT")
    if [ "$SLICES" -gt 1 ]; then
        run gcloud compute tpus queued-resources create "$NAME" "${COMMON[@]}" \
            --accelerator-type="$ACCEL" --runtime-version="$VERSION" \
            --node-count="$SLICES" --node-prefix="$NAME" "${extra[@]}"
        echo "# wait until 'gcloud compute tpus queued-resources describe $NAME' shows ACTIVE" >&2
    else
        run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" \
            --accelerator-type="$ACCEL" --version="$VERSION" "${extra[@]}"
    fi
}

STOP_CMD='pkill -f "python[0-9.]* -u -m trainer\." || true; sleep 2; pkill -9 -f "python[0-9.]* -u -m trainer\." || true; sudo rm -f /tmp/libtpu_lockfile /tmp/tpu_logs/*.lock 2>/dev/null || true'

do_stop() {
    for node in "${NODES[@]}"; do remote "$node" "$STOP_CMD"; done
}

do_copy() {
    local tarball=/tmp/seq2seq-code-$NAME.tar.gz
    if [ "$DRY" = 1 ]; then
        echo "# (cd $ROOT && git ls-files -co --exclude-standard | tar czf $tarball -T -)"
    else
        (cd "$ROOT" && git ls-files -co --exclude-standard | tar czf "$tarball" -T -)
    fi
    for node in "${NODES[@]}"; do
        run gcloud compute tpus tpu-vm scp "$tarball" "$node:seq2seq-code.tar.gz" "${COMMON[@]}" --worker=all
        remote "$node" "mkdir -p $REMOTE_DIR && tar xzf seq2seq-code.tar.gz -C $REMOTE_DIR && rm seq2seq-code.tar.gz"
    done
}

INSTALL_CMD="cd $REMOTE_DIR && (test -d ~/seq2seq-venv || python3 -m venv ~/seq2seq-venv) && ~/seq2seq-venv/bin/pip install -q -U pip && ~/seq2seq-venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'"

do_install() {
    for node in "${NODES[@]}"; do remote "$node" "$INSTALL_CMD"; done
}

train_cmd() {
    local args="" a
    for a in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do args+=" $(printf '%q' "$a")"; done
    local py="~/seq2seq-venv/bin/python -u -m trainer.train$args"
    if [ "$BACKGROUND" = 1 ]; then
        echo "mkdir -p ~/seq2seq-logs && cd $REMOTE_DIR && nohup $py > ~/seq2seq-logs/train.log 2>&1 < /dev/null & echo started on \$(hostname)"
    else
        echo "mkdir -p ~/seq2seq-logs && cd $REMOTE_DIR && set -o pipefail && $py 2>&1 | tee ~/seq2seq-logs/train.log"
    fi
}

do_train() {
    local cmd pids=() rc=0 node
    cmd=$(train_cmd)
    if [ "${#NODES[@]}" = 1 ]; then
        remote "${NODES[0]}" "$cmd"
        return
    fi
    # Multi-slice: every slice must run at once (a dry run prints them in slice order).
    if [ "$DRY" = 1 ]; then
        for node in "${NODES[@]}"; do remote "$node" "$cmd"; done
        return
    fi
    for node in "${NODES[@]}"; do remote "$node" "$cmd" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    return "$rc"
}

# A hang (exit code 7, trainer/watchdog.py: no step within train.hang_timeout) restarts training
# from the last checkpoint, up to --max-restarts times; any other failure stops.
train_with_restarts() {
    local rc=0 restarts=0
    while :; do
        rc=0; do_train || rc=$?
        [ "$rc" = 7 ] && [ "$restarts" -lt "$MAX_RESTARTS" ] || return "$rc"
        restarts=$((restarts + 1))
        echo "tpu_pod.sh: training hung (exit 7; stacks in WORKDIR/hang/); restart $restarts of $MAX_RESTARTS from the last checkpoint" >&2
        do_stop
    done
}

do_logs() {
    local node w
    [ "$DRY" = 1 ] || mkdir -p "$LOGS_DIR"
    for node in "${NODES[@]}"; do
        for ((w = 0; w < $(workers_of); w++)); do
            run gcloud compute tpus tpu-vm scp "$node:seq2seq-logs/train.log" \
                "$LOGS_DIR/$node-worker$w.log" "${COMMON[@]}" --worker="$w"
        done
    done
}

do_delete() {
    if [ "$SLICES" -gt 1 ]; then
        run gcloud compute tpus queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet
    else
        run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
    fi
}

for action in "${ACTIONS[@]}"; do
    case "$action" in
        up)
            [ "$CREATE" = 1 ] && do_create
            do_stop; do_copy; do_install
            train_rc=0; train_with_restarts || train_rc=$?
            do_logs || true
            [ "$DELETE" = 1 ] && do_delete
            [ "$train_rc" = 0 ] || { echo "tpu_pod.sh: training failed ($train_rc)" >&2; exit "$train_rc"; }
            ;;
        train) train_with_restarts ;;
        *) "do_$action" ;;
    esac
done
