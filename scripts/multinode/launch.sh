#!/usr/bin/env bash
# Launch pre-training or fine-tuning on several nodes with DeepSpeed's launcher (scripts/multinode/README.md).
#
#   bash scripts/multinode/launch.sh HOSTFILE MASTER_ADDR ENTRY [flags for ENTRY...]
#
# ENTRY is vimpac/pretrain.py or vimpac/finetune.py (relative to the repository root); MASTER_ADDR is the address
# of the first node of the run, as the other nodes reach it. Environment:
#   NUM_NODES=N | INCLUDE=SPEC | EXCLUDE=SPEC   → deepspeed --num_nodes / --include / --exclude (SPEC: host[:slots]@…)
#   MASTER_PORT (29500)     the rendezvous port on MASTER_ADDR
#   LAUNCHER (pdsh)         pdsh only: DeepSpeed's MPI and SLURM runners start ranks without RANK/LOCAL_RANK
#                           (they expect mpi4py's discovery), which vimpac refuses; LAUNCHER_ARGS → --launcher_args
#   NO_SSH=1 NODE_RANK=k    no ssh at all: run this same command on every node, k = 0 … nodes-1 (--no_ssh)
#   PYTHON (python3)        the interpreter holding deepspeed; remote nodes run the same absolute path
#   PDSH_SSH_ARGS_APPEND    extra ssh options (e.g. "-F ~/cluster_ssh_config -p 2222"): used by pdsh and by the
#                           reachability check below
#   FORWARD_ENV="A B"       more variables to export on the remote nodes (beside DS_ACCELERATOR, OMP_NUM_THREADS,
#                           DEEPSPEED_TIMEOUT, TRITON_INTERPRET, GLOO_*, NCCL_*, TORCH_*)
#   FAILURE_GRACE_S (30)    pdsh: once a node's command failed, the seconds the others get before every node is
#                           stopped (DeepSpeed's pdsh launch otherwise waits on the survivors, which can hang)
#   SKIP_SSH_CHECK=1        skip the per-host ssh check
#
# Before anything starts (pdsh), this script fails with a message and a non-zero status when the hostfile is
# missing or has a line that is not `HOST slots=N` (DeepSpeed's runner would train on the local machine alone
# when the hostfile is missing), or when a selected host does not answer
# `ssh -o BatchMode=yes -o ConnectTimeout=5 HOST` or lacks the repository, the interpreter or ENTRY at this
# node's paths.
set -uo pipefail

die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}
note() { echo "launch.sh: $*" >&2; }

if [ $# -lt 3 ]; then
  echo "usage: bash $0 HOSTFILE MASTER_ADDR ENTRY [flags...]   (ENTRY: vimpac/pretrain.py or vimpac/finetune.py)" >&2
  exit 2
fi
HOSTFILE=$1 MASTER_ADDR=$2 ENTRY=$3
shift 3

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
# Absolute before the cd: the runner reads it from the repository root.
[ -e "$HOSTFILE" ] || die "hostfile $HOSTFILE does not exist (DeepSpeed would fall back to this machine alone)"
if [ ! -f "$HOSTFILE" ] || [ ! -r "$HOSTFILE" ]; then die "hostfile $HOSTFILE is not a readable file"; fi
HOSTFILE=$(cd "$(dirname "$HOSTFILE")" && pwd -P)/$(basename "$HOSTFILE")
cd "$REPO" || die "cannot enter $REPO"
[ -f "$ENTRY" ] || die "entry script $ENTRY not found under $REPO (vimpac/pretrain.py or vimpac/finetune.py)"
[ -n "$MASTER_ADDR" ] || die "MASTER_ADDR is empty"

MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=$(printf '%s' "${LAUNCHER:-pdsh}" | tr '[:upper:]' '[:lower:]')
FAILURE_GRACE_S=${FAILURE_GRACE_S:-30}
[[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "MASTER_PORT=$MASTER_PORT is not a port number"
[ "$LAUNCHER" = pdsh ] || die "LAUNCHER=$LAUNCHER: only pdsh is supported (or NO_SSH=1 on every node); the MPI and \
SLURM runners start ranks without RANK/LOCAL_RANK"
[[ $FAILURE_GRACE_S =~ ^[0-9]+$ ]] || die "FAILURE_GRACE_S=$FAILURE_GRACE_S is not a number of seconds"

PYTHON=$(command -v "${PYTHON:-python3}") || die "no python interpreter ${PYTHON:-python3} on PATH"
"$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)' \
  || die "$PYTHON cannot import deepspeed (activate the venv, or set PYTHON=/path/to/venv/bin/python)"
# The runner starts `sys.executable` on every node: the venv must sit at this same path there.
PYTHON_EXE=$("$PYTHON" -c 'import sys; print(sys.executable)')
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PYTHON" -c 'import sys; print(sys.prefix)')/torch_extensions}

# --- the hostfile, parsed strictly: `HOST slots=N` per line, blank lines and # comments allowed -------------------
hosts=()
declare -A slots_of=()
lineno=0
while IFS= read -r raw || [ -n "$raw" ]; do
  lineno=$((lineno + 1))
  line=${raw%%#*}                                   # a trailing comment
  line=$(printf '%s' "$line" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')
  [ -z "$line" ] && continue
  if [[ $line =~ ^([^[:space:]=]+)[[:space:]]+slots=([0-9]+)$ ]]; then
    host=${BASH_REMATCH[1]} n=$((10#${BASH_REMATCH[2]}))
    ((n > 0)) || die "$HOSTFILE:$lineno: host $host has slots=0"
    [ -z "${slots_of[$host]+x}" ] || die "$HOSTFILE:$lineno: host $host is listed twice"
    hosts+=("$host")
    slots_of[$host]=$n
  else
    die "$HOSTFILE:$lineno: expected 'HOST slots=N', got: $raw"
  fi
done <"$HOSTFILE"
((${#hosts[@]} > 0)) || die "hostfile $HOSTFILE names no host (lines must be 'HOST slots=N')"

# --- the hosts this run uses (DeepSpeed's --include/--exclude/--num_nodes rules) --------------------------------
filters=()
set_count=0
for name in NUM_NODES INCLUDE EXCLUDE; do [ -n "${!name:-}" ] && set_count=$((set_count + 1)); done
((set_count <= 1)) || die "set only one of NUM_NODES, INCLUDE, EXCLUDE (DeepSpeed refuses the combinations)"
active=("${hosts[@]}")
spec_hosts() { # SPEC → "host count-of-listed-slots (or all)" per node spec
  local spec host slot_list parts
  IFS='@' read -ra parts <<<"$1"
  for spec in "${parts[@]}"; do
    host=${spec%%:*}
    [ -n "${slots_of[$host]+x}" ] || die "host '$host' in '$1' is not in $HOSTFILE"
    if [[ $spec == *:* ]]; then
      slot_list=${spec#*:}
      echo "$host $(tr ',' '\n' <<<"$slot_list" | sort -u | grep -c .)"
    else
      echo "$host all"
    fi
  done
}
if [ -n "${INCLUDE:-}" ]; then
  declare -A included=()
  selected=$(spec_hosts "$INCLUDE") || exit 2
  while read -r host _; do included[$host]=1; done <<<"$selected"
  active=()
  for host in "${hosts[@]}"; do [ -n "${included[$host]:-}" ] && active+=("$host"); done
  filters=(--include "$INCLUDE")
elif [ -n "${EXCLUDE:-}" ]; then
  declare -A excluded=()
  selected=$(spec_hosts "$EXCLUDE") || exit 2
  while read -r host count; do
    if [ "$count" = all ]; then excluded[$host]=${slots_of[$host]}; else excluded[$host]=$((${excluded[$host]:-0} + count)); fi
  done <<<"$selected"
  active=()
  for host in "${hosts[@]}"; do ((${excluded[$host]:-0} >= slots_of[$host])) || active+=("$host"); done
  filters=(--exclude "$EXCLUDE")
elif [ -n "${NUM_NODES:-}" ]; then
  [[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES=$NUM_NODES is not a positive number"
  ((NUM_NODES <= ${#hosts[@]})) || die "NUM_NODES=$NUM_NODES but $HOSTFILE lists ${#hosts[@]} hosts"
  active=("${hosts[@]:0:NUM_NODES}")
  filters=(--num_nodes "$NUM_NODES")
fi
((${#active[@]} > 0)) || die "no host left after the INCLUDE/EXCLUDE filter"

runner=("$PYTHON" -u -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${filters[@]}"
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

# --- no-ssh mode: this node's share only; every node runs the same command with its own NODE_RANK --------------
if [ "${NO_SSH:-0}" = 1 ]; then
  [[ ${NODE_RANK:-} =~ ^[0-9]+$ ]] || die "NO_SSH=1 needs NODE_RANK=k (0 … $((${#active[@]} - 1)), this node's line)"
  ((NODE_RANK < ${#active[@]})) || die "NODE_RANK=$NODE_RANK but the run has ${#active[@]} nodes (${active[*]})"
  note "no-ssh mode: node rank $NODE_RANK of ${#active[@]} (${active[$NODE_RANK]}), master $MASTER_ADDR:$MASTER_PORT"
  exec "${runner[@]}" --no_ssh --node_rank "$NODE_RANK" "$ENTRY" "$@"
fi

# --- every selected host answers ssh and has this checkout and interpreter at the same paths --------------------
if [ "$LAUNCHER" = pdsh ] && [ "${SKIP_SSH_CHECK:-0}" != 1 ]; then
  command -v pdsh >/dev/null || die "pdsh is not installed on this node (apt-get install pdsh), or use NO_SSH=1"
  read -ra ssh_extra <<<"${PDSH_SSH_ARGS_APPEND:-}" # a word list, as pdsh reads it
  probe="cd $(printf '%q' "$REPO") 2>/dev/null || exit 101; test -x $(printf '%q' "$PYTHON_EXE") || exit 102"
  probe+="; test -f $(printf '%q' "$ENTRY") || exit 103"
  checks=$(mktemp -d) || die "mktemp failed"
  for host in "${active[@]}"; do
    (
      timeout 30 ssh -o BatchMode=yes -o ConnectTimeout=5 "${ssh_extra[@]}" "$host" "$probe" \
        >"$checks/$host.out" 2>&1 </dev/null
      echo $? >"$checks/$host.rc"
    ) &
  done
  wait
  failed=0
  for host in "${active[@]}"; do
    rc=$(cat "$checks/$host.rc")
    why=$(tail -n 3 "$checks/$host.out" | tr '\n' ' ')
    case $rc in
      0) continue ;;
      101) echo "launch.sh: error: host $host has no $REPO (every node needs this checkout at the same path)" >&2 ;;
      102) echo "launch.sh: error: host $host has no interpreter $PYTHON_EXE (the venv must sit at the same path)" >&2 ;;
      103) echo "launch.sh: error: host $host has no $REPO/$ENTRY (same code on every node)" >&2 ;;
      124) echo "launch.sh: error: host $host: ssh did not finish within 30 s ($why)" >&2 ;;
      *) echo "launch.sh: error: host $host does not answer 'ssh -o BatchMode=yes -o ConnectTimeout=5 $host' (exit $rc: $why)" >&2 ;;
    esac
    failed=1
  done
  rm -rf "$checks"
  ((failed == 0)) || die "not launching: fix the host(s) above or drop them from $HOSTFILE (EXCLUDE=host)"
fi

# --- the environment of the remote ranks: DeepSpeed exports the variables of its .deepspeed_env file -----------
# The runner reads ~/.deepspeed_env and ./.deepspeed_env (or DS_ENV_FILE); this script writes one file holding
# both (comments and blank lines dropped: DeepSpeed cannot read them) and then this shell's values of the
# variables below, which therefore win. PYTHON* variables (PYTHONPATH = this checkout) are exported by the runner
# itself.
work=$(mktemp -d) || die "mktemp failed"
trap 'rm -rf "$work"' EXIT
env_file=$work/deepspeed_env
for f in "${HOME:-/nonexistent}/.deepspeed_env" "$REPO/.deepspeed_env"; do
  [ -f "$f" ] && grep -E '^[[:space:]]*[A-Za-z_][A-Za-z0-9_]*=' "$f" >>"$env_file"
done
read -ra forward <<<"DS_ACCELERATOR OMP_NUM_THREADS DEEPSPEED_TIMEOUT TRITON_INTERPRET ${FORWARD_ENV:-}"
while read -r name; do
  case $name in GLOO_* | NCCL_* | TORCH_*) forward+=("$name") ;; esac
done < <(compgen -e)
for name in "${forward[@]}"; do
  [ -n "${!name+x}" ] || continue
  value=${!name}
  [[ $value == *$'\n'* ]] && die "cannot forward $name: its value holds a newline"
  printf '%s=%s\n' "$name" "$value" >>"$env_file"
done
touch "$env_file"
export DS_ENV_FILE=$env_file # absolute: both lookup places of the runner resolve to it

launch_args=(--launcher "$LAUNCHER")
[ -n "${LAUNCHER_ARGS:-}" ] && launch_args+=(--launcher_args "$LAUNCHER_ARGS")
# --force_multi: a filter that leaves one host must still run there, not on this machine; --no_ssh_check: every
# host was checked above (DeepSpeed checks only the first, and without PDSH_SSH_ARGS_APPEND).
launch_args+=(--force_multi --no_ssh_check)
note "launching on ${#active[@]} node(s): ${active[*]} (master $MASTER_ADDR:$MASTER_PORT, launcher $LAUNCHER)"

if [ "$LAUNCHER" != pdsh ]; then
  "${runner[@]}" "${launch_args[@]}" "$ENTRY" "$@"
  exit $?
fi

# pdsh: stream the output and watch for a node whose command failed ("pdsh@…: HOST: ssh exited with exit code N").
# pdsh keeps waiting for the other nodes, whose ranks may wait forever on the dead peer (a failure during the
# process-group setup hangs the survivors past DeepSpeed's 10-minute timeout), so after FAILURE_GRACE_S the runner
# gets SIGTERM: it stops pdsh and runs its kill command on every node (pkill -f of the node launchers, which stop
# their ranks).
fifo=$work/output
mkfifo "$fifo" || die "mkfifo failed"
"${runner[@]}" "${launch_args[@]}" "$ENTRY" "$@" >"$fifo" 2>&1 &
runner_pid=$!
stop_runner() { kill -TERM "$runner_pid" 2>/dev/null; }
trap stop_runner INT TERM
deadline='' buffer=
while :; do
  # -t 1: wake every second to look at the deadline; a timeout keeps the partial line in `part`
  IFS= read -r -t 1 part
  status=$?
  if ((status > 128)); then # a timeout or a signal (forwarded by the trap): keep the partial line
    buffer+=$part
  elif ((status != 0)); then # end of the output
    [ -n "$buffer$part" ] && printf '%s\n' "$buffer$part"
    break
  else
    line=$buffer$part buffer=
    printf '%s\n' "$line"
    if [ -z "$deadline" ] && [[ $line =~ ^pdsh@[^:]*:\ ([^ ]+):\ ssh\ exited\ with\ exit\ code\ ([0-9]+) ]]; then
      note "node ${BASH_REMATCH[1]} failed (exit ${BASH_REMATCH[2]}): every node is stopped in ${FAILURE_GRACE_S} s unless the run ends first"
      deadline=$((SECONDS + FAILURE_GRACE_S))
    fi
  fi
  if [ -n "$deadline" ] && ((SECONDS >= deadline)); then
    note "stopping every node: ${FAILURE_GRACE_S} s after a node failed, the run has not ended"
    stop_runner
    deadline=$((SECONDS + 1000000000)) # once
  fi
done <"$fifo"
rc=0
wait "$runner_pid" || rc=$?
while ((rc > 128)) && kill -0 "$runner_pid" 2>/dev/null; do # wait was interrupted by a signal
  rc=0
  wait "$runner_pid" || rc=$?
done
if ((rc == 0)) && [ -n "$deadline" ]; then
  rc=1 # a node failed: never report success
fi
((rc == 0)) || note "the run failed (exit $rc)"
exit "$rc"
