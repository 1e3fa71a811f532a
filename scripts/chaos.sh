#!/usr/bin/env bash
# Fault-injection test of resume, kept out of CI (with 2 cores to itself: under a minute for
# --quick, ~5 minutes for the demo; several times that when the cores are shared):
# runs a pipeline straight into a reference run folder, then again into a chaos run folder while
# killing `align run` with SIGKILL at N seeded random moments — spread over the stages and, within
# a training stage, mid-step, mid-evaluation, mid-save or at start-up — restarting it after each
# kill. After one kill it also truncates the newest checkpoint's largest file (to half its size) in
# a stage that has an older one to fall back to. Then it lets the run finish and compares every
# training stage's final/ files byte for byte with the reference run's (and every evaluation's
# results). Exits non-zero when any differ, a restart fails with an error of its own, or a
# truncated checkpoint is not noticed.
#   scripts/chaos.sh [--kills N] [--pipeline FILE | --quick] [--seed S] [--step-delay MS]
#                    [--work DIR] [--reuse-reference]
# --quick runs scripts/chaos-quick.toml (every stage kind in a few steps) instead of the demo.
# --step-delay (default 50) slows every training step with the fault-injection hook
# ALIGN_TEST_STEP_DELAY_MS, in both runs, to widen the windows the kills aim at.
# --work (default runs/chaos/NAME) holds reference/, chaos/ and logs/ (one log per `align run`).
# --reuse-reference keeps a finished reference run from an earlier call with the same settings.
set -euo pipefail
cd "$(dirname "$0")/.."

kills=8 pipeline=pipelines/medical-demo.toml seed=1 step_delay=50 work= reuse_reference=0
while (($#)); do
  case $1 in
    --kills) kills=$2; shift 2 ;;
    --pipeline) pipeline=$2; shift 2 ;;
    --quick) pipeline=scripts/chaos-quick.toml; shift ;;
    --seed) seed=$2; shift 2 ;;
    --step-delay) step_delay=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --reuse-reference) reuse_reference=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "chaos.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -f $pipeline ]] || { echo "chaos.sh: $pipeline: no such pipeline file" >&2; exit 2; }
name=$(basename "$pipeline" .toml)
work=$(mkdir -p "${work:-runs/chaos/$name}" && cd "${work:-runs/chaos/$name}" && pwd)
reference=$work/reference chaos=$work/chaos logs=$work/logs
step() { printf '\n== %s\n' "$*" >&2; }
say() { printf '%s\n' "$*" >&2; }

source scripts/env.sh
py=$VIRTUAL_ENV/bin/python
step "build (with the fault-injection hooks)"
cargo build --release -p align-cli --features align-cli/fault-injection
align=$PWD/target/release/align

# A sleep without a process per call (the watcher polls every 10 ms on shared cores).
exec {nap_fd}<> <(:)
nap() { read -rt "$1" -u "$nap_fd" || true; }
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
clock() { ms=${EPOCHREALTIME/[.,]/} ms=$((ms / 1000)); } # sets $ms without a subshell
seconds() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); } # milliseconds → "12.3"

# True while $pid runs (a child that exited but is not yet waited for still answers kill -0).
alive() {
  local stat
  { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# Starts `align run` into run folder $1 in the background, its output in log $2; sets $pid.
start_align() {
  ALIGN_TEST_STEP_DELAY_MS=$step_delay "$align" run "$pipeline" --set "pipeline.run_dir=$1" >"$2" 2>&1 &
  pid=$!
}

# Waits for $pid to exit, at most $1 seconds (then kills it: status 124); returns its status.
wait_exit() {
  local deadline=$((SECONDS + $1)) rc=0
  while alive; do
    if ((SECONDS >= deadline)); then
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      return 124
    fi
    nap 0.2
  done
  wait "$pid" || rc=$?
  return "$rc"
}

# What went wrong, from a log's end (align prints its error last, on one line).
error_of() { tail -n 2 "$1"; }

# ---------------------------------------------------------------------------------------------
step "reference run (straight): $reference"
mkdir -p "$logs"
if ((reuse_reference)) && [[ -f $work/reference.ms && $(cat "$work/reference.settings" 2>/dev/null) == "$pipeline $step_delay" ]]; then
  say "reusing the finished reference run"
else
  rm -rf "$reference" "$work/reference.ms"
  started=$(now_ms)
  start_align "$reference" "$logs/reference.log"
  rc=0; wait_exit 7200 || rc=$?
  if ((rc != 0)); then
    say "chaos: the reference run failed (status $rc): $(error_of "$logs/reference.log")"
    exit 1
  fi
  echo $(($(now_ms) - started)) >"$work/reference.ms"
  echo "$pipeline $step_delay" >"$work/reference.settings"
fi
ref_ms=$(cat "$work/reference.ms")
say "reference run: $(seconds "$ref_ms") s"

# ---------------------------------------------------------------------------------------------
# The plan, from the reference run: one line per stage (name, kind, whether it trains, steps,
# save_every, eval_every — 0 when it has no evaluations — and the reference's ms per step), one
# per kill (stage index, moment, step K, delay) and the kill after which to truncate a checkpoint.
# Moments: `start` (DELAY ms after the stage starts in this process), `step` (DELAY ‰ of a step
# after step K is logged — a step as long as the last one this process took: inside step K+1, or
# its evaluation or save), `eval` (DELAY ms after step K, an evaluation step, is logged), `save`
# (DELAY ms after checkpoint-K's temporary folder appears). A moment the run is already past when
# it restarts fires at once. Kills go to distinct stages first (every stage once when N ≥ the
# number of stages), the rest where the reference run spent its time.
plan=$("$py" - "$reference" "$kills" "$seed" <<'PY'
import json, random, sys
from pathlib import Path

run, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
TRAINING = {"pretrain", "sft", "reward", "dpo", "ppo"}
stages = []
for name in json.loads((run / "pipeline.json").read_text())["stages"]:
    rec = json.loads((run / name / "stage.json").read_text())
    st = {"name": name, "kind": rec["kind"], "seconds": rec.get("duration_seconds") or 0.1}
    st["training"] = rec["kind"] in TRAINING
    if st["training"]:
        train = rec["config"]["train"]
        st["total"] = rec["summary"]["total_steps"]
        st["save_every"] = train.get("save_every", 0)
        metrics = (run / name / "metrics.jsonl").read_text()
        st["eval_every"] = train.get("eval_every", 0) if '"eval_loss"' in metrics else 0
        total, every = st["total"], st["save_every"]
        st["saves"] = sorted({s for s in range(every, total + 1, every)} | {total}) if every else [total]
        st["evals"] = list(range(st["eval_every"], total + 1, st["eval_every"])) if st["eval_every"] else []
    stages.append(st)

def target(i):
    st = stages[i]
    if not st["training"]:
        return (i, "start", 0, rng.uniform(0, 0.9 * st["seconds"] * 1000))
    moments = ["step", "step", "start", "save"] + (["eval"] if st["evals"] else [])
    moment = rng.choice(moments)
    if moment == "start":
        return (i, moment, 0, rng.uniform(0, min(2000, st["seconds"] * 500)))
    if moment == "save":
        return (i, moment, rng.choice(st["saves"]), rng.uniform(0, 3))
    if moment == "eval":
        return (i, moment, rng.choice(st["evals"]), rng.uniform(0, 5))
    return (i, moment, rng.randrange(st["total"]), rng.uniform(0, 1000))

order = list(range(len(stages)))
rng.shuffle(order)
chosen = order[:kills]
weights = [st["seconds"] for st in stages]
chosen += rng.choices(range(len(stages)), weights=weights, k=max(0, kills - len(stages)))
plan = [target(i) for i in chosen]

# The truncation needs a kill in a stage that has two complete checkpoints by then and is not
# finished: after its second save, before its last step. Retarget a kill if none is.
def two_checkpoints(t):
    st = stages[t[0]]
    return st["training"] and t[1] in ("step", "eval") and sum(s < t[2] for s in st["saves"]) >= 2
eligible = [i for i, st in enumerate(stages) if st["training"] and len(st["saves"]) >= 2 and st["saves"][1] + 1 < st["total"]]
if plan and not any(map(two_checkpoints, plan)) and eligible:
    hits = [t[0] for t in plan]
    in_eligible = [j for j, t in enumerate(plan) if t[0] in eligible]
    most = max(hits.count(h) for h in hits)
    j = rng.choice(in_eligible or [j for j, t in enumerate(plan) if hits.count(t[0]) == most])
    i = plan[j][0] if plan[j][0] in eligible else rng.choice(eligible)
    st = stages[i]
    plan[j] = (i, "step", rng.randrange(st["saves"][1] + 1, st["total"]), rng.uniform(0, 1000))
plan.sort(key=lambda t: (t[0], t[1] != "start", t[2]))
candidates = [j for j, t in enumerate(plan) if two_checkpoints(t)]

for st in stages:
    step_ms = int(st["seconds"] * 1000 / st["total"]) if st["training"] else 0
    print("stage", st["name"], st["kind"], int(st["training"]), st.get("total", 0), st.get("save_every", 0), st.get("eval_every", 0), step_ms)
for i, moment, k, delay in plan:
    print("kill", i, moment, k, int(delay))
print("truncate_after", rng.choice(candidates) if candidates else -1)
PY
)
names=() kinds=() trains=() totals=() save_every=() eval_every=() step_ms=()
plan_stage=() plan_moment=() plan_step=() plan_delay=() truncate_after=-1
while read -r what a b c d e f g; do
  case $what in
    stage) names+=("$a") kinds+=("$b") trains+=("$c") totals+=("$d") save_every+=("$e") eval_every+=("$f") step_ms+=("$g") ;;
    kill) plan_stage+=("$a") plan_moment+=("$b") plan_step+=("$c") plan_delay+=("$d") ;;
    truncate_after) truncate_after=$a ;;
  esac
done <<<"$plan"

# ---------------------------------------------------------------------------------------------
# What the `align run` started after $marker has got to in run folder $1: p_stage, the index of
# the newest stage it started (-1: none yet), p_status its status (running/done), p_step the last
# step that stage logged in this process (-1: it has not opened its metrics yet; 0: no step yet).
progress() {
  p_stage=-1 p_status= p_step=-1 p_last=
  local i rec text lines
  for ((i = ${#names[@]} - 1; i >= 0; i--)); do
    rec=$1/${names[i]}/stage.json
    [[ $rec -nt $marker ]] || continue
    IFS= read -r -d '' text <"$rec" || true
    [[ $text =~ \"status\":\ *\"(running|done)\" ]] || continue # later stages are marked stale
    p_stage=$i p_status=${BASH_REMATCH[1]}
    break
  done
  ((p_stage >= 0 && trains[p_stage])) || return 0
  local metrics=$1/${names[p_stage]}/metrics.jsonl
  [[ $metrics -nt $marker ]] || return 0
  p_step=0
  mapfile -t lines <"$metrics"
  for ((i = ${#lines[@]} - 1; i >= 0 && i >= ${#lines[@]} - 2; i--)); do # the last may be half-written
    if [[ ${lines[i]} =~ \"step\":([0-9]+) ]]; then p_step=${BASH_REMATCH[1]}; p_last=${lines[i]}; break; fi
  done
}

# True once the run has got to kill $1's moment; sets $past when it is already past it. Keeps
# $step_took, how long the last step the watcher saw took (ms; 0 until it has seen two), and
# $pace, that step's length per mille of the reference run's (the cores are shared: it varies).
reached() {
  local i=${plan_stage[$1]} k=${plan_step[$1]} tmp
  progress "$chaos"
  if ((p_stage != seen_stage || p_step != seen_step)); then
    clock
    if ((p_stage == seen_stage && seen_step >= 0 && p_step == seen_step + 1)); then
      step_took=$((ms - seen_at)) pace=$((1000 * (ms - seen_at) / (step_ms[p_stage] + 1)))
    fi
    seen_at=$ms
  fi
  seen_stage=$p_stage seen_step=$p_step past=1
  ((p_stage > i)) && return 0
  ((p_stage == i)) || return 1
  [[ $p_status == done ]] && return 0
  past=0
  case ${plan_moment[$1]} in
    start) return 0 ;;
    step | eval) ((p_step > k)) && past=1; ((p_step >= k)) ;;
    save)
      tmp=("$chaos/${names[i]}"/.checkpoint-"$k".tmp-*)
      [[ -e ${tmp[0]} ]] && return 0
      ((p_step > k)) && past=1
      ((past))
      ;;
  esac
}

# The wait after kill $1's moment (ms): none when the run was already past it; a start-up delay
# at the pace the run has gone lately.
delay_of() {
  local d=${plan_delay[$1]} took=${step_ms[plan_stage[$1]]}
  ((step_took > 0)) && took=$step_took
  ((past)) && d=0
  case ${plan_moment[$1]} in
    step) d=$((d * took / 1000)) ;;
    start) d=$((d * pace / 1000)) ;;
  esac
  delay=$d
}

# Where the killed run was, read from what it left on disk: sets $where and $where_stage.
classify() {
  local out tmp
  progress "$chaos"
  if ((p_stage < 0)); then where="at start-up, before it started a stage" where_stage="(start-up)"; return; fi
  where_stage=${names[p_stage]}
  if [[ $p_status == done ]]; then where="after $where_stage finished, before the next stage" where_stage="(between)"; return; fi
  case ${kinds[p_stage]} in
    tokenizer) where="mid-tokenizer training"; return ;;
    init) where="mid-initialisation"; return ;;
    eval) where="mid-evaluation"; return ;;
  esac
  out=$chaos/$where_stage
  local k=$p_step total=${totals[p_stage]} evals=${eval_every[p_stage]} saves=${save_every[p_stage]}
  local evaluates=$((evals > 0 && k > 0 && (k % evals == 0 || k == total)))
  local saves_here=$((k > 0 && ((saves > 0 && k % saves == 0) || k == total)))
  tmp=("$out"/.checkpoint-*.tmp-*)
  if [[ -e ${tmp[0]} ]]; then
    tmp=${tmp[0]##*/.}; where="mid-save of ${tmp%%.tmp-*}"
  elif tmp=("$out"/.final.tmp-* "$out"/.best.tmp-*) && [[ -e ${tmp[0]} || -e ${tmp[1]} ]]; then
    where="mid-save of final/ (or best/)"
  elif ((k < 0)); then
    where="at start-up (loading the models and data, resuming)"
  elif ((evaluates)) && [[ $p_last != *eval_loss* ]]; then
    where="mid-evaluation after step $k"
  elif ((saves_here)) && [[ ! -f $out/checkpoint-$k/COMPLETE ]]; then
    where="about to save checkpoint-$k"
  elif ((k >= total)); then
    where="finishing after its last step (final/, summary)"
  else
    where="in step $((k + 1)) of $total"
  fi
}

# Truncates the largest file of the newest complete checkpoint of the stage the run was killed in,
# when it has an older complete one; true when it did.
truncate_checkpoint() {
  ((p_stage >= 0 && trains[p_stage])) && [[ $p_status == running ]] || return 1
  local out=$chaos/${names[p_stage]} n=0 newest=-1 c k
  for c in "$out"/checkpoint-*/COMPLETE; do
    [[ -f $c ]] || continue
    k=${c%/COMPLETE} k=${k##*/checkpoint-}
    n=$((n + 1)) newest=$((k > newest ? k : newest))
  done
  ((n >= 2)) || return 1
  local largest size
  newest=$out/checkpoint-$newest
  read -r size largest < <(find "$newest" -type f -printf '%s %p\n' | sort -n | tail -n 1)
  truncate -s $((size / 2)) "$largest"
  truncated="${largest#"$chaos"/} ($size → $((size / 2)) bytes)"
}

# ---------------------------------------------------------------------------------------------
step "chaos run: $chaos — ${#plan_stage[@]} kills (seed $seed)"
rm -rf "$chaos" "$logs"/chaos-*.log
marker=$work/.started
restart_timeout=$((3 * ref_ms / 1000 + 120)) # seconds, for each restart (shared cores vary)
pace=1000 n_kills=0 n_truncations=0 failures=() killed_in=() truncated= truncated_at=-1
for ((j = 0; j < ${#plan_stage[@]}; j++)); do
  log=$logs/chaos-$((j + 1)).log
  touch "$marker"
  nap 0.01 # stage records written from here on are newer than the marker
  started=$(now_ms)
  start_align "$chaos" "$log"
  deadline=$((SECONDS + restart_timeout))
  seen_stage=-1 seen_step=-1 seen_at=0 step_took=0
  while alive && ! reached "$j" && ((SECONDS < deadline)); do nap 0.01; done
  delay_of "$j"
  aimed="${names[plan_stage[j]]} ${plan_moment[j]} ${plan_step[j]} +$delay ms"
  [[ ${plan_moment[j]} == step ]] && aimed+=" (${plan_delay[j]}‰ of a step)"
  ((past)) && aimed+=", already past it"
  nap "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
  at=$(($(now_ms) - started))
  kill -KILL "$pid" 2>/dev/null || true
  rc=0; wait "$pid" 2>/dev/null || rc=$?
  if ((rc == 0)); then
    say "kill $((j + 1)): not reached — the run finished first [aimed: $aimed]"
    break
  elif ((rc != 137)); then
    failures+=("restart $((j + 1)) failed (status $rc): $(error_of "$log")")
    say "restart $((j + 1)) FAILED (status $rc) — $log:"; error_of "$log" >&2
    break
  elif ((SECONDS >= deadline)); then
    failures+=("restart $((j + 1)) timed out after ${restart_timeout}s ($log)")
    say "restart $((j + 1)) TIMED OUT"
    break
  fi
  n_kills=$((n_kills + 1))
  classify
  killed_in+=("$where_stage")
  line="kill $n_kills, $(seconds "$at") s into restart $((j + 1)): $where_stage, $where"
  if ((n_truncations == 0 && truncate_after >= 0 && j >= truncate_after)) && truncate_checkpoint; then
    n_truncations=1 truncated_at=$j
    line+="; truncated $truncated"
  fi
  say "$line  [aimed: $aimed]"
done

step "chaos run: to the end"
touch "$marker"
start_align "$chaos" "$logs/chaos-final.log"
rc=0; wait_exit "$restart_timeout" || rc=$?
if ((rc != 0)); then
  failures+=("the last restart failed (status $rc): $(error_of "$logs/chaos-final.log")")
  say "the last restart FAILED (status $rc):"; error_of "$logs/chaos-final.log" >&2
fi
if ((n_truncations)); then
  fallbacks=$(for ((j = truncated_at + 1; j < ${#plan_stage[@]}; j++)); do cat "$logs/chaos-$((j + 1)).log" 2>/dev/null; done
    cat "$logs/chaos-final.log")
  if grep -q 'broken newer checkpoint' <<<"$fallbacks"; then
    say "the truncated checkpoint was noticed: $(grep -m1 'broken newer checkpoint' <<<"$fallbacks" | sed 's/^.*WARN[^ ]* //')"
  else
    failures+=("the truncated checkpoint ($truncated) was never reported as broken")
  fi
else
  say "no kill found a stage with two complete checkpoints: nothing truncated"
fi

# ---------------------------------------------------------------------------------------------
# Every stage's final/ (training stages, and what tokenizer and init stages made) file by file;
# an evaluation stage's results in its stage.json (all but the path of the model it evaluated).
step "final weights: reference vs chaos"
same=0 trained=0
for ((i = 0; i < ${#names[@]}; i++)); do
  s=${names[i]}
  if [[ ${kinds[i]} == eval ]]; then
    verdict=$("$py" -c 'import json, sys
a, b = ({k: v for k, v in (json.load(open(p)).get("eval") or {}).items() if k != "model"} for p in sys.argv[1:])
print("same" if a == b else f"DIFFERENT: {a} vs {b}")' "$reference/$s/stage.json" "$chaos/$s/stage.json" 2>&1) || true
    say "$(printf '%12s' "$s"): evaluation results $verdict"
    [[ $verdict == same ]] || failures+=("$s: evaluation results differ")
    continue
  fi
  [[ -d $reference/$s/final ]] || continue
  ((trains[i])) && trained=$((trained + 1))
  ref_files=$(cd "$reference/$s/final" && find . -type f | sort)
  chaos_files=$(cd "$chaos/$s/final" 2>/dev/null && find . -type f | sort) || chaos_files=
  differ=()
  if [[ $ref_files != "$chaos_files" ]]; then
    differ=("the file lists")
  else
    while read -r f; do
      cmp -s "$reference/$s/final/$f" "$chaos/$s/final/$f" || differ+=("${f#./}")
    done <<<"$ref_files"
  fi
  n=$(wc -l <<<"$ref_files")
  if ((${#differ[@]} == 0)); then
    ((trains[i])) && same=$((same + 1))
    say "$(printf '%12s' "$s"): final weights same ($n files of final/ byte-identical)"
  else
    say "$(printf '%12s' "$s"): final weights DIFFERENT (${differ[*]})"
    failures+=("$s: final/ differs (${differ[*]})")
  fi
done

# the stages the kills landed in, in pipeline order, then (start-up) / (between) if any did
hit=
for w in "${names[@]}" "(start-up)" "(between)"; do
  [[ " ${killed_in[*]} " == *" $w "* ]] && hit+=${hit:+, }$w
done
say ""
for f in "${failures[@]}"; do say "FAILED: $f"; done
echo "chaos: survived $n_kills kills ($n_truncations truncations) in stages [$hit]; final weights identical in $same of $trained training stages"
say "logs: $logs"
((${#failures[@]} == 0))
